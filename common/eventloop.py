"""The event loop the gateway, the HQ bridge and their benchmarks run on.

``run(main)`` is ``asyncio.run(main)`` on uvloop where it is installed, on
the standard asyncio loop otherwise. uvloop (libuv, the loop under Node.js)
wakes futures and runs callbacks with far less Python per step; a lane's
durable commit is a few such steps around each fdatasync, so eight lanes
commit ~20% more records/s on it (bench/journal.py prints the loop it ran on).
It ships wheels for x86-64 and aarch64 (64-bit Raspberry Pi OS); elsewhere,
or with ``STOREGATE_EVENT_LOOP=asyncio`` in the environment, the standard
loop runs the same code. The test suite runs the in-process gateway on
asyncio and the gateway and bridge processes on uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """"uvloop" or "asyncio": the loop ``run`` uses in this environment."""
    if os.environ.get("STOREGATE_EVENT_LOOP", "").strip().lower() == "asyncio":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop ``loop_name()`` names."""
    if loop_name() == "uvloop":
        import uvloop
        return uvloop.run(main)
    return asyncio.run(main)
