"""Adapter registry: upload, validate, store, version, resolve and delete tenants' LoRA adapters."""
