"""FP8 base weights and deterministic mode: what changes in a model once its float weights are loaded.

`prepare` swaps the decoder's projections (q/k/v, o, gate/up, down) for engine/quant/linear.py's layers:
FP8 weights (from an FP8 checkpoint's scales, or quantized here per output row) and, in deterministic
mode, batch-invariant products for every projection and the logits. Embeddings, norms, the LM head's
weight and the LoRA adapters stay in the model dtype (docs/quantization.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.quant.checkpoint import ModuleScales
from engine.quant.linear import Fp8Linear, InvariantLinear, Matmul, fp8_gemm_usable
from kernels import batch_invariant, fp8

QUANTIZATIONS = ("fp8",)
_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def invariant_matmul(device: torch.device) -> Matmul:
    """The batch-invariant F.linear of this device: the fixed-tile Triton kernel on CUDA, else per row."""
    return batch_invariant.linear if device.type == "cuda" else batch_invariant.linear_rows_ref


def prepare(
    model: nn.Module,
    *,
    quantize: bool,
    checkpoint_scales: dict[str, ModuleScales] | None,
    deterministic: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """In place. quantize: FP8 from the float weights, per output row; checkpoint_scales: the weights
    already hold FP8 values (an FP8 checkpoint) and these are their scales (modules absent stay float)."""
    matmul: Matmul = invariant_matmul(device) if deterministic else F.linear
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in _PROJECTIONS:
            continue
        new: nn.Module | None = None
        weight, bias = module.weight.data, None if module.bias is None else module.bias.data
        if checkpoint_scales is not None and name in checkpoint_scales:
            scales = checkpoint_scales[name]
            # Exact: the checkpoint's FP8 values went through the float dtype unchanged.
            w8 = weight.to(fp8.FP8)
            new = _fp8(w8, scales.weight.to(device), bias, scales.input, deterministic, matmul, device, dtype)
        elif quantize and checkpoint_scales is None:
            w8, scale = fp8.quantize_rows(weight)
            new = _fp8(w8, scale, bias, None, deterministic, matmul, device, dtype)
        elif deterministic:
            new = InvariantLinear(module, matmul)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the float weights just replaced: free for the KV cache's sizing
    if deterministic:
        # compute_logits' product [B, H] x [V, H]: the same batch-invariant kernel.
        model.logits_matmul = lambda hidden, weight: matmul(hidden, weight, None)  # type: ignore[assignment]


def _fp8(
    w8: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    deterministic: bool,
    matmul: Matmul,
    device: torch.device,
    dtype: torch.dtype,
) -> Fp8Linear:
    # cuBLAS's FP8 product picks its algorithm from the batch: deterministic mode dequantizes instead.
    gemm = not deterministic and fp8_gemm_usable(device, dtype, w8.shape[0], w8.shape[1])
    static = None if input_scale is None else input_scale.to(device)
    return Fp8Linear(w8, scale, bias, static, fp8_gemm=gemm, matmul=matmul)
