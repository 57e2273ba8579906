"""A tapped stream's frames on their way to the store, never holding the stream up.

The tap offers each chunk's frames as they pass and goes on; a task of the stream's own
takes what has queued up (while it stores one batch, the next gathers), a batch at a
time, through the provider into the store. Frames that only carry text (as the
provider tells from their bytes) only move their turn's last activity: they wait up to
`text_delay` for the frames after them, so that a stream's tokens are stored a batch at
a time rather than one transaction each; any other frame, a full batch or the end of
the stream has what is held stored at once. If the store cannot write or the queue is
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


@dataclass(slots=True)
class _Held:
    """Frames offered together (or events), whether each only carries text, when they
    came (the clock's time) and when they are due to be stored (the loop's time)."""

    frames: Sequence[RawFrame | Event]
    text: Sequence[bool]
    at: float
    due: float


@dataclass(slots=True)
class FeedContext:
    store: Store
    stats: ConnectorStats
    warnings: RepeatedWarnings
    clock: Callable[[], float]
    queue_frames: int
    batch_frames: int
    text_delay: float = 0.0  # seconds text frames may wait for the frames after them
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class TapFeed:
    def __init__(self, ctx: FeedContext, mapper: FrameMapper) -> None:
        self._ctx = ctx
        self._mapper = mapper
        self._held: deque[_Held] = deque()
        self._held_frames = 0
        self._closed = False
        self._flush = False  # a frame that is not text is held: store what is held now
        self._wake = asyncio.Event()  # frames are held
        self._loop = asyncio.get_running_loop()
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
            ctx, first = self._ctx, not self._held
            text = self._mapper.text_flags(frames)
            self._held.append(_Held(frames, text, ctx.clock(), self._loop.time() + ctx.text_delay))
            self._held_frames += len(frames)
            if not self._flush and not all(text):
                self._flush = True
            if first or self._flush or self._held_frames >= ctx.batch_frames:
                self._wake.set()

    def close(self) -> None:
        """No more frames: what is queued is still stored, in the background."""
        self._closed = True
        self._wake.set()

    async def _run(self) -> None:
        batch = self._ctx.batch_frames
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._held:
                wait = self._held[0].due - self._loop.time()
                if wait > 0 and not (self._flush or self._closed or self._held_frames >= batch):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    self._wake.clear()
                    continue
                await self._store(self._take(batch))
            self._flush = False
            if self._closed:
                return

    def _take(self, limit: int) -> list[_Held]:
        """Up to `limit` frames from the front of the queue, with when they came."""
        batch: list[_Held] = []
        while self._held and limit > 0:
            held = self._held.popleft()
            if len(held.frames) > limit:
                rest = _Held(held.frames[limit:], held.text[limit:], held.at, held.due)
                self._held.appendleft(rest)
                held = _Held(held.frames[:limit], held.text[:limit], held.at, held.due)
            batch.append(held)
            limit -= len(held.frames)
            self._held_frames -= len(held.frames)
        return batch

    async def _store(self, batch: list[_Held]) -> None:
        mapper = self._mapper
        received_at = datetime.fromtimestamp(batch[0].at, UTC)
        raws: list[RawFrame] = []
        text: list[bool] = []
        events: list[Event] = []
        for held in batch:
            for item in held.frames:
                if isinstance(item, RawFrame):
                    raws.append(item)
                else:
                    events.append(item)
            if held.frames and isinstance(held.frames[0], RawFrame):
                text.extend(held.text)
        count = sum(len(held.frames) for held in batch)
        try:
            events.extend(mapper.events(mapper.read(raws, text), received_at))
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
