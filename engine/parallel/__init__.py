"""Tensor parallelism: one engine's model split over N ranks, Megatron-style, with sharded LoRA
(docs/parallel.md). The engine process is rank 0 (driver.py); ranks 1..N-1 are worker processes
(worker.py); sharding.py says who holds what; protocol.py what rank 0 sends each step."""
