"""Engine configuration: one frozen object, built by the caller (CLI/app/tests); the engine never reads env."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.spec.config import SpeculativeConfig

_DTYPES = ("float32", "float16", "bfloat16", "auto")
_KERNEL_BACKENDS = ("auto", "triton", "ref")
_QUANTIZATIONS = (None, "fp8")


@dataclass(frozen=True)
class EngineConfig:
    # Path to a Hugging Face model folder (config.json, *.safetensors, tokenizer files).
    model: str
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # "auto" = bfloat16 on cuda, float32 on cpu.
    dtype: str = "auto"
    # Tokens per KV block; also the prefix cache's granularity (only full blocks are shared).
    block_size: int = 16
    # Exact number of KV blocks; wins over kv_cache_bytes and gpu_memory_fraction when set.
    num_kv_blocks: int | None = None
    # Bytes for the KV cache (the CPU budget); on GPU the default is a fraction of free memory.
    kv_cache_bytes: int | None = None
    # On GPU: the share of total device memory the engine may use (weights + adapters + KV).
    gpu_memory_fraction: float = 0.9
    # Most sequences in one step.
    max_num_seqs: int = 64
    # Token budget of one step (prefill chunks + decodes); smaller = shorter steps, more chunking.
    max_num_batched_tokens: int = 2048
    # Longest prompt + output; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # GPU adapter slots: how many distinct adapters can be in one batch.
    max_loras: int = 4
    # CPU tier (pinned memory on GPU hosts) for adapters not currently in a GPU slot.
    max_cpu_loras: int = 8
    # Adapters of higher rank are refused; slots are padded to this rank.
    max_lora_rank: int = 64
    # Processes that read, hash, parse and stack adapters, so loads never compete with the step loop for
    # the GIL (engine/adapter_process.py). None = 8 on CUDA (at most half the cores), 0 (threads) on CPU.
    adapter_load_processes: int | None = None
    # MiB of pinned memory for the CPU tier, allocated once at start (engine/pinned_pool.py). None = on
    # CUDA room for max_cpu_loras of the largest adapter, a power of two, at most 16 GiB and a quarter of
    # the host's memory (engine/adapter_setup.py); off on CPU. 0 = off: a fresh pinned buffer per load.
    adapter_pinned_pool_mb: int | None = None
    # Slot writes as one host -> device copy per adapter plus device-side copies (engine/lora_slots.py).
    adapter_batched_copy: bool = True
    # A finished prefetched load takes the least recently used unpinned slot when no slot is free.
    adapter_eager_slots: bool = True
    # Reuse KV of full blocks with the same (salt, adapter, tokens) chain.
    enable_prefix_caching: bool = True
    # auto = Triton on CUDA, torch reference on CPU.
    kernel_backend: str = "auto"
    # Replay decode steps from CUDA graphs (batch-size buckets up to max_num_seqs). CUDA + Triton only;
    # ignored elsewhere. Off = every step eager (for debugging, or to save the graphs' memory).
    cuda_graphs: bool = True
    # Async scheduling: while the GPU runs a decode step, the next one is scheduled and launched with the
    # sampled tokens still on the device; the host reads a step's tokens while the next one runs. Only for
    # batches whose sampling needs no earlier tokens (no penalties, min_tokens, logprobs) with nothing
    # waiting; results are the same either way (seeded sampling included).
    async_scheduling: bool = True
    # Seed for requests without their own seed (sampling) and for random init in demos.
    seed: int = 0
    # Base-model weights: None = as the checkpoint stores them (an FP8 checkpoint's quantization_config is
    # followed); "fp8" = float8_e4m3fn with one scale per output row, quantized at load from a float
    # checkpoint. LoRA adapters stay in `dtype` (docs/quantization.md).
    quantization: str | None = None
    # Same request, same tokens, whatever else is in the batch and from run to run: batch-invariant
    # products, no split reductions (docs/quantization.md has the cost).
    deterministic: bool = False
    # Speculative decoding, vLLM's dict shape (docs/speculative.md): {"method": "ngram" | "draft_model",
    # "num_speculative_tokens": k, ...}; a dict is checked and turned into a SpeculativeConfig. None: off.
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None
    # Ranks (GPUs) one engine's model is split over, Megatron-style (docs/parallel.md): N - 1 worker
    # processes beside this one, NCCL on CUDA, gloo on the CPU.
    tensor_parallel_size: int = 1
    # vLLM's option (docs/parallel.md): column-parallel LoRA shrinks sharded too (each rank holds
    # max_lora_rank / N rows of A, padded up to a multiple of N) plus one all-gather per such layer.
    # Accepted and ignored at tensor_parallel_size 1, as vLLM does.
    fully_sharded_loras: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_loras < 0:
            raise ValueError(f"max_loras must be >= 0, got {self.max_loras}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.adapter_load_processes is not None and self.adapter_load_processes < 0:
            raise ValueError(f"adapter_load_processes must be >= 0, got {self.adapter_load_processes}")
        if self.adapter_pinned_pool_mb is not None and self.adapter_pinned_pool_mb < 0:
            raise ValueError(f"adapter_pinned_pool_mb must be >= 0, got {self.adapter_pinned_pool_mb}")
        if self.max_lora_rank <= 0:
            raise ValueError(f"max_lora_rank must be positive, got {self.max_lora_rank}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}"
            )
        if self.tensor_parallel_size > 1 and (
            self.quantization is not None or self.deterministic or self.speculative_config is not None
        ):
            raise ValueError(
                "tensor_parallel_size > 1 does not combine with quantization, deterministic or "
                "speculative_config yet"
            )
        if not isinstance(self.fully_sharded_loras, bool):
            raise ValueError(f"fully_sharded_loras must be a bool, got {self.fully_sharded_loras!r}")
        if self.kernel_backend not in _KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {_KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be None or 'fp8', got {self.quantization!r}")
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """speculative_config, checked (__post_init__ turned a dict into this)."""
        assert not isinstance(self.speculative_config, dict)
        return self.speculative_config
