"""PEFT LoRA adapters: reading a folder (adapter_config.json + adapter_model.safetensors, nothing else).

An adapter becomes, per target module m, A [L, r_m, in_m] and B [L, out_m, r_m] (zeros for layers it
skips) plus one scaling. Modules whose own scaling differs (rank_pattern / alpha_pattern) get the ratio
folded into B, so one per-slot scale serves every module in a fused launch.
Everything is validated against the base model: an adapter is tenant data, and a bad one must be
refused with a clear message rather than crash or corrupt a batch shared with other tenants.

Loading is on the serving path (a cold adapter delays its requests' first token), so it touches the
bytes as few times as it can: one bounded read into the loader thread's reused buffer, hashed chunk by
chunk on a second thread as it lands and while the header is parsed into views of that buffer (no copy),
one copy per (layer, module) into a single (pinned) buffer in the target dtype, then one min/max pass
over the result for NaN/Inf. docs/engine.md has the measured times.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.adapter_file import ReadBuffer, Sha256Thread, parse_safetensors, read_bounded
from engine.adapter_format import (
    CONFIG_FILE,
    FUSED_MODULES,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    AdapterError,
    LoraConfig,
    check_lora_config,
    parse_config_json,
    parse_tensor_name,
)
from engine.load_stages import StageClock
from engine.model_config import ModelConfig
from engine.models.rope import head_rows_perm
from engine.ops import LORA_MODULES, MODULE_GROUPS

# ATen runs an element-wise op on the calling thread alone up to this many elements (its grain size).
_SERIAL_NUMEL = 32768


@dataclass
class LoRAAdapter:
    content_hash: str
    rank: int  # largest rank over its modules
    scaling: float  # per-slot scale; per-module differences are folded into `b`
    a: dict[str, Tensor]  # module -> [L, r_m, in_m]
    b: dict[str, Tensor]  # module -> [L, out_m, r_m]
    ranks: Tensor  # [L, G] int32: rank of each fused module group per layer (0 = not targeted)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-capable projection of the base model."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in adapter folder", "malformed_config", "adapter_config")
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(
            f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", "config_too_large", "adapter_config"
        )
    try:
        return parse_config_json(raw)
    except AdapterError as exc:
        raise AdapterError(f"{CONFIG_FILE}: {exc}", exc.code, exc.field) from None


def check_adapter_config(
    raw: dict[str, Any], max_rank: int, num_layers: int | None = None, model_type: str | None = None
) -> LoraConfig:
    """The adapter-format contract (engine/adapter_format.py), the same checks upload validation runs:
    every PEFT feature our LoRA path does not compute refused by name, every value in range, the targets
    those of `model_type` (None: any architecture's)."""
    try:
        return check_lora_config(raw, max_rank, model_type, num_layers)
    except AdapterError as exc:
        raise AdapterError(f"{CONFIG_FILE}: {exc}", exc.code, exc.field) from None


def load_adapter(
    folder: str | Path,
    model_cfg: ModelConfig,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    expected_hash: str | None = None,
    pin: bool | None = None,
    read_buffer: ReadBuffer | None = None,
    clock: StageClock | None = None,
    out_buffer: Callable[[int], Tensor] | None = None,
) -> LoRAAdapter:
    """Read and validate a PEFT adapter folder into CPU tensors of `dtype`.

    Every A and B is a view of one buffer, page-locked when `pin` (None: when CUDA is available), so the
    adapter is one allocation for the CPU tier and its slot copies can run asynchronously. Pinned buffers
    come from torch's caching host allocator, which is the CPU tier's buffer pool: a freed adapter's block
    is reused only after every CUDA copy recorded on it has completed (torch records an event per
    non-blocking copy), and pinning fresh pages (slow, and serialising in the driver) stops once warm.
    `read_buffer`: the calling thread's own, reused across its loads (None: a fresh one). `clock`: laps
    read, parse, alloc, stack, finite, hash_wait (engine/load_stages.py). `out_buffer(nbytes)`: the uint8
    buffer to stack into instead of a fresh one (a loader process's shared staging block)."""
    clock = clock or StageClock()
    path = Path(folder)
    spec = check_adapter_config(
        read_adapter_config(path), max_rank, model_cfg.num_layers, model_cfg.model_type
    )
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterError(f"no {WEIGHTS_FILE} in adapter folder (other weight formats are refused)")
    shapes = module_shapes(model_cfg)
    # Largest file a valid adapter can be (fp32, every module at max_rank, plus header room): anything
    # bigger is refused before it is read into memory.
    limit = 4 * model_cfg.num_layers * max_rank * sum(i + o for i, o in shapes.values()) + (1 << 20)
    pin = torch.cuda.is_available() if pin is None else pin
    # sha256 runs on its own thread (hashlib lets go of the GIL), fed chunk by chunk as they are read,
    # so it overlaps the read and then the parsing of the very same bytes: what is hashed is exactly what
    # is parsed, since nothing writes the buffer after its chunk was read.
    digest = Sha256Thread()
    try:
        data = read_bounded(weights_file, limit, max_rank, read_buffer or ReadBuffer(), digest)
        clock.lap("read")
        try:
            adapter = _build(
                data,
                spec,
                shapes,
                model_cfg.num_layers,
                max_rank,
                dtype,
                pin,
                clock,
                out_buffer,
                rotary_rows(model_cfg),
            )
        except AdapterError as exc:
            _check_hash(digest.hexdigest(), expected_hash, cause=exc)  # a forged file is named as such first
            raise
    finally:
        digest.join()  # whatever happened: the read buffer is this thread's to reuse only after this
    adapter.content_hash = digest.hexdigest()
    clock.lap("hash_wait")  # what of the sha256 did not overlap the read and the parsing
    _check_hash(adapter.content_hash, expected_hash)
    return adapter


def _build(
    data: memoryview,
    spec: LoraConfig,
    shapes: dict[str, tuple[int, int]],
    layers: int,
    max_rank: int,
    dtype: torch.dtype,
    pin: bool,
    clock: StageClock,
    out_buffer: Callable[[int], Tensor] | None,
    rows: dict[str, Tensor],
) -> LoRAAdapter:
    tensors = parse_safetensors(data)
    found = _pair_tensors(tensors, spec, layers)
    fused_shapes = {
        m: (shapes[parts[0]][0], sum(shapes[p][1] for p in parts)) for m, parts in FUSED_MODULES.items()
    }
    scaling, per_module = _check_and_scale(found, spec, {**shapes, **fused_shapes}, max_rank)
    per_module = _split_fused(per_module, shapes, rows)
    clock.lap("parse")
    nbytes = _layout(per_module, shapes, layers, dtype)[2]
    if out_buffer is not None:
        buffer = out_buffer(nbytes)
    else:
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    clock.lap("alloc")
    adapter, values = _stack(scaling, per_module, shapes, layers, dtype, buffer)
    clock.lap("stack")
    _refuse_non_finite(values, adapter)
    clock.lap("finite")
    return adapter


def _check_hash(content_hash: str, expected: str | None, cause: Exception | None = None) -> None:
    if expected is not None and content_hash != expected:
        message = f"adapter weights sha256 {content_hash} does not match expected {expected}"
        raise AdapterError(message) from cause


def _pair_tensors(
    tensors: dict[str, Tensor], spec: LoraConfig, layers: int
) -> dict[tuple[int, str], dict[str, Tensor]]:
    """(layer, module) -> {"A": tensor, "B": tensor}: exactly one pair for each targeted module of each
    transformed layer; every other tensor name is refused."""
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        layer, module, which = parse_tensor_name(key, layers)
        if module not in spec.target_modules or not spec.transforms(layer):
            raise AdapterError(f"tensor {key!r} is for a module or layer that adapter_config does not target")
        found.setdefault((layer, module), {})[which] = tensor
    for layer in range(layers):
        for module in spec.target_modules if spec.transforms(layer) else ():
            if set(found.get((layer, module), ())) != {"A", "B"}:
                raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
    return found


def _check_and_scale(
    found: dict[tuple[int, str], dict[str, Tensor]],
    spec: LoraConfig,
    shapes: dict[str, tuple[int, int]],
    max_rank: int,
) -> tuple[float, dict[tuple[int, str], tuple[Tensor, Tensor, float]]]:
    """Validate each pair's shapes and rank against the model and the config (values are checked after
    stacking). Returns the adapter's scale and (layer, module) -> (A [r, in], B [out, r], the factor by
    which this module's own scale differs from the adapter's, to be folded into B)."""
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
    for (layer, module), pair in found.items():
        name = f"layer {layer} {module}"
        a, b = pair["A"], pair["B"]
        d_in, d_out = shapes[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, r) or r <= 0:
            raise AdapterError(
                f"{name}: shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                f"[r, {d_in}] / [{d_out}, r] of the base model"
            )
        if r > max_rank:
            raise AdapterError(f"{name}: rank {r} exceeds max_lora_rank {max_rank}")
        if r != spec.rank_of(layer, module):
            raise AdapterError(
                f"{name}: rank {r} disagrees with adapter_config ({spec.rank_of(layer, module)})"
            )
        per_module[(layer, module)] = (a, b, spec.scaling_of(layer, module) / spec.scaling)
    return spec.scaling, per_module


def rotary_rows(cfg: ModelConfig) -> dict[str, Tensor]:
    """Partial-rotary models (Phi-4-mini): the row order of q_proj and k_proj outputs the model was
    loaded with (engine/models/rope.py), which every LoRA B of q and k must follow; {} otherwise."""
    if cfg.rotary_dim is None or cfg.rotary_dim == cfg.head_dim:
        return {}
    return {
        "q_proj": head_rows_perm(cfg.num_heads, cfg.head_dim, cfg.rotary_dim),
        "k_proj": head_rows_perm(cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim),
    }


def _split_fused(
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor, float]],
    shapes: dict[str, tuple[int, int]],
    rows: dict[str, Tensor],
) -> dict[tuple[int, str], tuple[Tensor, Tensor, float]]:
    """A LoRA on a fused projection (Phi-3's qkv_proj, gate_up_proj) as one LoRA per part: the same A,
    B cut by rows. x @ A.T @ B.T of the fused module is exactly the parts' outputs side by side, so the
    slots, the kernels and the q/k/v and gate/up launches stay as they are; the price is the shrink
    x @ A.T done once per part (3x for q/k/v) and A stored per part. `rows`: q/k B rows reordered as the
    model's (rotary_rows)."""
    if rows:
        split = _split_fused(per_module, shapes, {})
        return {key: (a, b[rows[key[1]]] if key[1] in rows else b, r) for key, (a, b, r) in split.items()}
    out: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
    for (layer, module), (a, b, ratio) in per_module.items():
        parts = FUSED_MODULES.get(module)
        if parts is None:
            out[(layer, module)] = (a, b, ratio)
            continue
        for part, b_part in zip(parts, b.split([shapes[p][1] for p in parts], dim=0), strict=True):
            out[(layer, part)] = (a, b_part, ratio)
    return out


def _layout(
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor, float]],
    shapes: dict[str, tuple[int, int]],
    layers: int,
    dtype: torch.dtype,
) -> tuple[dict[str, int], int, int]:
    """(rank of each targeted module, bytes of all A/B values, bytes of the buffer with ranks after them).
    Modules go in LORA_MODULES order, each as its A [L, r, in] then its B [L, out, r]."""
    module_rank: dict[str, int] = {}
    for (_, module), (a, _, _) in per_module.items():
        module_rank[module] = max(module_rank.get(module, 0), a.shape[0])
    module_rank = {m: module_rank[m] for m in LORA_MODULES if m in module_rank}
    values, nbytes = stacked_sizes(module_rank, shapes, layers, dtype)
    return module_rank, values, nbytes


def _stack(
    scaling: float,
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor, float]],
    shapes: dict[str, tuple[int, int]],
    layers: int,
    dtype: torch.dtype,
    buffer: Tensor,
) -> tuple[LoRAAdapter, Tensor]:
    """Per module, stack the layers into A [L, r_m, in] / B [L, out, r_m] (zeros where a layer is skipped
    or has a lower rank), all views of `buffer` (uint8, sized by `_layout`). Returns the adapter and all
    its A/B values, flat."""
    module_rank, values, _ = _layout(per_module, shapes, layers, dtype)
    a_out, b_out, ranks = stacked_views(buffer, module_rank, shapes, layers, dtype)
    flat = buffer[:values].view(dtype)
    by_module: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {m: {} for m in module_rank}
    for (layer, module), pair in per_module.items():
        by_module[module][layer] = pair
    start = 0
    for m, r in module_rank.items():
        (d_in, d_out), pairs = shapes[m], by_module[m]
        region = flat[start : start + layers * r * (d_in + d_out)]
        start += region.numel()
        if len(pairs) == layers and all(a.shape[0] == r for a, _, _ in pairs.values()):
            # The usual adapter: every layer at one rank, so the layers' A then B tile the region in order.
            _fill(region, [(pairs[i][0], 1.0) for i in range(layers)] + [pairs[i][1:] for i in range(layers)])
            continue
        region.zero_()  # skipped layers and ranks below r stay zero
        for layer, (a, b, ratio) in pairs.items():
            _copy_into(a_out[m][layer, : a.shape[0]], a, 1.0)
            _copy_into(b_out[m][layer, :, : a.shape[0]], b, ratio)
    group_of = {m: g for g, group in enumerate(MODULE_GROUPS) for m in group}
    rank_rows = [[0] * len(MODULE_GROUPS) for _ in range(layers)]
    for (layer, module), (a, _, _) in per_module.items():
        g = group_of[module]
        rank_rows[layer][g] = max(rank_rows[layer][g], a.shape[0])
    ranks.copy_(torch.tensor(rank_rows, dtype=torch.int32))
    adapter = LoRAAdapter(
        content_hash="", rank=max(module_rank.values()), scaling=scaling, a=a_out, b=b_out, ranks=ranks
    )
    return adapter, flat


def stacked_views(
    buffer: Tensor,
    module_rank: dict[str, int],
    shapes: dict[str, tuple[int, int]],
    layers: int,
    dtype: torch.dtype,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """A [L, r, in] and B [L, out, r] of each module, and ranks [L, G], as views of `buffer` (uint8, the
    `_layout` of these module ranks)."""
    values, nbytes = stacked_sizes(module_rank, shapes, layers, dtype)
    if buffer.dtype != torch.uint8 or buffer.numel() != nbytes:
        raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} for an adapter of {nbytes} bytes")
    flat = buffer[:values].view(dtype)
    a_out: dict[str, Tensor] = {}
    b_out: dict[str, Tensor] = {}
    start = 0
    for m, r in module_rank.items():
        d_in, d_out = shapes[m]
        region = flat[start : start + layers * r * (d_in + d_out)]
        start += region.numel()
        a_out[m] = region[: layers * r * d_in].view(layers, r, d_in)
        b_out[m] = region[layers * r * d_in :].view(layers, d_out, r)
    ranks = (
        buffer[nbytes - layers * len(MODULE_GROUPS) * 4 :].view(torch.int32).view(layers, len(MODULE_GROUPS))
    )
    return a_out, b_out, ranks


def stacked_sizes(
    module_rank: dict[str, int], shapes: dict[str, tuple[int, int]], layers: int, dtype: torch.dtype
) -> tuple[int, int]:
    """(bytes of the A/B values, bytes of the whole stacked buffer with the ranks after them)."""
    values = sum(layers * r * sum(shapes[m]) for m, r in module_rank.items()) * dtype.itemsize
    return values, -(-values // 64) * 64 + layers * len(MODULE_GROUPS) * 4


def _fill(region: Tensor, pieces: list[tuple[Tensor, float]]) -> None:
    """region (1-D, contiguous) = the pieces flattened and concatenated, each times its ratio."""
    if sum(piece.numel() for piece, _ in pieces) != region.numel():
        raise ValueError("pieces do not tile the region")
    if all(ratio == 1.0 and p.dtype == region.dtype and p.is_contiguous() for p, ratio in pieces):
        at = region.data_ptr()  # bytes only: a bare memmove per piece, no per-piece tensor ops
        for piece, _ in pieces:
            ctypes.memmove(at, piece.data_ptr(), piece.nbytes)
            at += piece.nbytes
        return
    offset = 0
    for piece, ratio in pieces:
        _copy_into(region[offset : offset + piece.numel()], piece.reshape(-1), ratio)
        offset += piece.numel()


def _copy_into(dst: Tensor, src: Tensor, ratio: float) -> None:
    """dst[...] = src * ratio in dst's dtype (the ratio applied in float32, rounded once), on this thread.

    Loads run on several threads beside the step loop; torch would wake its intra-op thread team for each
    of the hundreds of pieces, and with a few loads at once those teams wait on one another far longer
    than the copies take. So: a plain memmove when no conversion is needed (it lets go of the GIL too),
    otherwise torch ops kept under ATen's grain size, which run on the calling thread alone."""
    if ratio == 1.0 and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
        if dst.shape != src.shape:
            raise ValueError(f"copy of {tuple(src.shape)} into {tuple(dst.shape)}")
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.nbytes)
        return
    rows = max(1, _SERIAL_NUMEL // max(1, dst[0].numel()))
    for i in range(0, dst.shape[0], rows):
        part = src[i : i + rows]
        dst[i : i + rows].copy_(part if ratio == 1.0 else part.float() * ratio)


def _refuse_non_finite(values: Tensor, adapter: LoRAAdapter) -> None:
    """`values`: every A and B of `adapter`, flat. One pass (NaN propagates to both ends of aminmax, and
    +-inf shows at one of them) over the final values in the target dtype, after the scale folding, so
    weights that overflow when narrowed (an fp32 value above fp16's range becomes inf) are refused too."""
    low, high = torch.aminmax(values)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise AdapterError(f"{_first_non_finite(adapter.a, adapter.b)}: weights hold NaN or infinity")


def _first_non_finite(a: dict[str, Tensor], b: dict[str, Tensor]) -> str:
    """Only for the error message of a refused adapter: which layer and module hold the bad values."""
    for module in a:
        for layer in range(a[module].shape[0]):
            if not (torch.isfinite(a[module][layer]).all() and torch.isfinite(b[module][layer]).all()):
                return f"layer {layer} {module}"
    return "adapter"
