"""A tapped stream's frames on their way to the store, never holding the stream up.

The tap offers each frame as it passes and goes on; a task of the stream's own takes
what has queued up, a batch at a time, through the provider into the store. If the
store cannot write or the queue is full, frames are dropped, counted and logged (at most
twice a minute), and the caller's stream flows on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from relay.connectors.frames import FrameMapper, store_events
from relay.connectors.sse import RawFrame
from relay.connectors.stats import ConnectorStats
from relay.events import Event
from relay.logs import RepeatedWarnings
from relay.store import Store

log = structlog.get_logger("relay.tap")

_Item = tuple[RawFrame | list[Event] | None, float]


@dataclass(slots=True)
class FeedContext:
    store: Store
    stats: ConnectorStats
    warnings: RepeatedWarnings
    clock: Callable[[], float]
    queue_frames: int
    batch_frames: int
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class TapFeed:
    def __init__(self, ctx: FeedContext, mapper: FrameMapper) -> None:
        self._ctx = ctx
        self._mapper = mapper
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="relay-tap-feed")
        ctx.tasks.add(self._task)
        self._task.add_done_callback(ctx.tasks.discard)

    def offer(self, frame: RawFrame | list[Event]) -> None:
        """Queue a frame (or events made without the provider) without waiting."""
        if self._queue.qsize() >= self._ctx.queue_frames:
            self._dropped(1, "the tap's queue is full")
            return
        self._queue.put_nowait((frame, self._ctx.clock()))

    def close(self) -> None:
        """No more frames: what is queued is still stored, in the background."""
        self._queue.put_nowait((None, 0.0))

    async def _run(self) -> None:
        queue, limit = self._queue, self._ctx.batch_frames
        while True:
            batch = [await queue.get()]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            await self._store([item for item in batch if item[0] is not None])
            if batch[-1][0] is None:
                return

    async def _store(self, batch: list[_Item]) -> None:
        if not batch:
            return
        mapper = self._mapper
        received_at = datetime.fromtimestamp(batch[0][1], UTC)
        frames, events = [], []
        for item, _ in batch:
            if isinstance(item, RawFrame):
                frame = mapper.frame(item.data, item.name, item.id)
                if frame is not None:
                    frames.append(frame)
            elif item is not None:
                events.extend(item)
        try:
            events.extend(mapper.events(frames, received_at))
            await store_events(self._ctx.store, events, received_at)
        except Exception as exc:
            self._dropped(len(batch), str(exc))

    def _dropped(self, frames: int, why: str) -> None:
        self._ctx.stats.add("store_failures", "tap", self._mapper.source, frames)
        held_back = self._ctx.warnings.admit("tap.not_stored")
        if held_back is not None:
            log.warning(
                "tap.not_stored",
                source=self._mapper.source,
                error=why,
                repeats_not_logged=held_back,
            )


async def finish_feeds(tasks: set[asyncio.Task[None]], grace: float) -> None:
    """Let feeds store what they hold for up to `grace` seconds, then stop them."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=grace)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
