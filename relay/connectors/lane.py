"""Work that can wait, given the event loop's spare time: one slot per loop iteration.

The tap passes chunks on as they come and leaves reading their frames to each stream's
feed (see `feed`). Were that reading done as soon as it could be, it would take its
turn on the loop between chunks, and under load every chunk would wait behind it. The
lane makes it wait instead: a feed asks for a slot (`await lane.turn()`), does one
bounded piece of work when it gets it, then asks again. The lane grants at most one
slot per loop iteration, so each iteration first runs everything else that is ready
(chunks to pass on) and then one slot; when nothing else is ready, iterations are short
and slots follow each other at once. Waiters are served in the order they asked, and
asking again queues behind every other waiter, so streams take turns.

A slot is the time from `turn()` returning to the holder's next `await`: nothing is
released, so a waiter cancelled before or after its slot came holds nothing up.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Lane:
    """Slots for background work, one per event loop iteration, first come first served;
    used from one event loop."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._armed = False  # `_grant` is due in the next loop iteration

    async def turn(self) -> None:
        """Wait for a slot: do one bounded piece of work on return, without awaiting."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        if not self._armed:
            self._armed = True
            loop.call_soon(self._grant, loop)
        await waiter

    def _grant(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the first waiter still waiting, and come back in the next iteration.

        `call_soon` callbacks added during an iteration run in the next one, in order: the
        woken waiter runs there before this does again, so it can ask again in time."""
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():  # not cancelled
                waiter.set_result(None)
                loop.call_soon(self._grant, loop)
                return
        self._armed = False
