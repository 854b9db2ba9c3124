"""Prometheus metrics (vLLM's names), one registry per app; served at GET /metrics."""

from app.metrics.registry import Metrics

__all__ = ["Metrics"]
