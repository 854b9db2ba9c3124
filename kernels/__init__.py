"""Triton kernels for the engine's GPU path, each with a plain-torch reference of the same signature.

`kernels.lora`: multi-LoRA shrink/expand over the per-step token -> slot grouping (`make_lora_meta`).
`kernels.attention`: KV-cache writes and causal attention over paged KV blocks (GQA, any mix of prefill,
extend and decode). Imports only torch and triton. See docs/kernels.md.
"""
