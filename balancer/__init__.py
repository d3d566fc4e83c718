"""balancer: a layer-4 (TCP) load balancer on asyncio."""

__version__ = "0.1.0"
