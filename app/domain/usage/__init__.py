"""Usage metering, billing routes, the sweeper and the /metrics route (docs/metering.md)."""
