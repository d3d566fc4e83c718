"""The multi-worker process model: only a run with `workers: N` > 1 loads this package.

`supervisor` is the primary, `worker` runs one Balancer per process, `control` is the channel
between them, `shared` is the memory-mapped table they share and `cluster` the primary's view
of it.
"""
