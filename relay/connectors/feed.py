"""A tapped stream's frames on their way to the store, never holding the stream up.

The tap offers each chunk's frames as they pass and goes on; a task of the stream's own
takes what has queued up (while it stores one batch, the next gathers), a batch at a
time, through the provider into the store. If the store cannot write or the queue is
full, frames are dropped, counted and logged (at most twice a minute), and the caller's
stream flows on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
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

_Item = tuple[Sequence[RawFrame | Event], float]  # frames offered together, and when


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
        self._held: deque[_Item] = deque()
        self._held_frames = 0
        self._closed = False
        self._wake = asyncio.Event()  # frames are held
        self._task = asyncio.create_task(self._run(), name="relay-tap-feed")
        ctx.tasks.add(self._task)
        self._task.add_done_callback(ctx.tasks.discard)

    def offer(self, frames: Sequence[RawFrame] | Sequence[Event]) -> None:
        """Queue frames read together (or events made without the provider) without
        waiting; those beyond the queue's room are dropped."""
        room = self._ctx.queue_frames - self._held_frames
        if len(frames) > room:
            self._dropped(len(frames) - max(room, 0), "the tap's queue is full")
            frames = frames[: max(room, 0)]
        if frames:
            self._held.append((frames, self._ctx.clock()))
            self._held_frames += len(frames)
            self._wake.set()

    def close(self) -> None:
        """No more frames: what is queued is still stored, in the background."""
        self._closed = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._held:
                await self._store(self._take(self._ctx.batch_frames))
            if self._closed:
                return

    def _take(self, limit: int) -> list[_Item]:
        """Up to `limit` frames from the front of the queue, with when they came."""
        batch: list[_Item] = []
        while self._held and limit > 0:
            frames, at = self._held.popleft()
            if len(frames) > limit:
                self._held.appendleft((frames[limit:], at))
                frames = frames[:limit]
            batch.append((frames, at))
            limit -= len(frames)
            self._held_frames -= len(frames)
        return batch

    async def _store(self, batch: list[_Item]) -> None:
        mapper = self._mapper
        received_at = datetime.fromtimestamp(batch[0][1], UTC)
        frames, events = [], []
        for items, _ in batch:
            for item in items:
                if isinstance(item, RawFrame):
                    frame = mapper.frame(item.data, item.name, item.id)
                    if frame is not None:
                        frames.append(frame)
                else:
                    events.append(item)
        count = sum(len(items) for items, _ in batch)
        try:
            events.extend(mapper.events(frames, received_at))
            await store_events(self._ctx.store, events, received_at)
        except Exception as exc:
            self._dropped(count, str(exc))

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
