"""Benchmark harness: `python -m benchmarks` compares the balancer with HAProxy and nginx."""
