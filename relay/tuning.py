"""Process-wide tuning for the long-running relay and writer processes."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def tune_gc() -> None:
    """Fewer and cheaper runs of the cyclic garbage collector.

    Under load the relay allocates many short-lived objects per request and keeps many
    long-lived ones (the writer's cached session records) that hold no reference cycles.
    With CPython's default thresholds the collector runs every 700 net allocations and its
    older passes walk every cached record: about a fifth of the writer's time. What is
    alive once the process has started (modules, settings) is frozen out of collection,
    and the young generation is collected every 50,000 allocations instead.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
