"""Event loop selection: `loop: auto | uvloop | asyncio`.

uvloop halves the cost of accepting a connection, so `auto` uses it whenever it imports. The
loop is always created by the process that runs it (after any fork), never inherited.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from .config import LoopName


def resolve_loop_name(name: LoopName) -> Literal["uvloop", "asyncio"]:
    """Map `auto` to the best loop available here; raise if `uvloop` is asked for but missing."""
    if name == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if name == "uvloop":
            raise RuntimeError(
                "loop: uvloop was requested but is not installed "
                "(pip install uvloop, or use loop: auto or asyncio)"
            ) from None
        return "asyncio"
    return "uvloop"


def new_event_loop(name: LoopName = "auto") -> asyncio.AbstractEventLoop:
    """Create (but do not install) a fresh event loop of the named kind."""
    if resolve_loop_name(name) == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
