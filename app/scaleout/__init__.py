"""Scale-out: the engine as a Ray Serve deployment of replicas, the API calling it through a handle.

Imported only by `loraplex serve --ray` (and its tests): plain `loraplex serve` never imports Ray.
docs/scale-out.md explains the two tiers, routing by adapter, failures and metrics.
"""
