"""A tapped stream's bytes on their way to the store, never holding the stream up.

The tap passes each chunk on first and hands the feed a copy (decoded) without reading
it (`append`): passing chunks on is what callers wait for, and on a busy process any work
done between chunks delays every chunk behind it. A task of the stream's own reads the
frames out of those bytes at a lower priority: a slice of at most 16 KiB at a time, each
when the process's lane grants it a slot (see `lane`: one slot per event loop iteration,
after the chunks ready to pass on; streams take turns). Should a stream's unread bytes
pass `queue_bytes`, the tap reads the oldest as it adds more, as it would without a lane:
memory stays bounded and no byte goes unread (skipping bytes would cut frames).

The same task stores the frames read, a batch at a time, through the provider (while it
stores one batch, the next bytes gather); mapping a batch to events waits for a slot of
the lane too, so that under load neither reading nor storing delays the chunks. Frames
that only carry text (as the provider tells from their bytes) only move their turn's
last activity: they wait up to `text_delay` from when their bytes came for the frames
after them, so that a stream's tokens are stored a batch at a time rather than one
transaction each; any other frame, a full batch or the end of the stream (once its
bytes are all read) has what is held stored at once. If the store cannot write or the
queue is full, frames are dropped, counted and logged (at most twice a minute), and the
caller's stream flows on.
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
from relay.connectors.lane import Lane
from relay.connectors.sse import RawFrame, SSEParser
from relay.connectors.stats import ConnectorStats
from relay.events import Event
from relay.logs import RepeatedWarnings
from relay.store import Store

log = structlog.get_logger("relay.tap")

_SLICE_BYTES = 16 * 1024  # bytes of one stream read in one slot of the lane, at most


@dataclass(slots=True)
class _Unread:
    """Bytes of the stream, when they came (the clock's time) and when text frames they
    end are due to be stored (the loop's time)."""

    data: bytes
    at: float
    due: float


@dataclass(slots=True)
class _Held:
    """Frames read together (or events), whether each only carries text, when they
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
    queue_bytes: int  # bytes a stream may hold unread before the tap reads them itself
    text_delay: float = 0.0  # seconds text frames may wait for the frames after them
    lane: Lane = field(default_factory=Lane)  # every feed's reading and mapping, in turns
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class TapFeed:
    def __init__(self, ctx: FeedContext, mapper: FrameMapper) -> None:
        self._ctx = ctx
        self._mapper = mapper
        self._parser = SSEParser()
        self._unread: deque[_Unread] = deque()
        self._unread_bytes = 0
        self._read_from = 0  # how much of the first unread chunk is read
        self._held: deque[_Held] = deque()
        self._held_frames = 0
        self._closed = False
        self._flush = False  # a frame that is not text is held: store what is held now
        self._wake = asyncio.Event()  # bytes, frames or the end came
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="relay-tap-feed")
        ctx.tasks.add(self._task)
        self._task.add_done_callback(ctx.tasks.discard)

    def append(self, chunk: bytes) -> None:
        """Queue the stream's next bytes, to be read in the background; past
        `queue_bytes` unread, read the oldest now (as many as came, give or take a slice)."""
        if not chunk:
            return
        ctx = self._ctx
        self._unread.append(_Unread(chunk, ctx.clock(), self._loop.time() + ctx.text_delay))
        self._unread_bytes += len(chunk)
        while self._unread_bytes > ctx.queue_bytes:
            self._read()
        self._wake.set()

    def offer(self, events: Sequence[Event]) -> None:
        """Queue events made without the provider (a conflict), stored at once."""
        ctx = self._ctx
        self._hold(events, ctx.clock(), self._loop.time() + ctx.text_delay)
        self._wake.set()

    def close(self) -> None:
        """No more bytes: what is unread is still read and stored, in the background."""
        self._closed = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._unread or self._held:
                if self._due():
                    await self._ctx.lane.turn()  # mapping frames to events waits as well
                    await self._store(self._take(self._ctx.batch_frames))
                elif self._unread:
                    await self._ctx.lane.turn()
                    if self._unread:  # unless the tap read them meanwhile
                        self._read()
                else:
                    await self._until_due()
            if self._closed:
                return

    def _read(self) -> None:
        """Read a slice of the first unread chunk and hold the frames it ends."""
        unread = self._unread[0]
        start = self._read_from
        data = unread.data[start : start + _SLICE_BYTES]  # the chunk itself if it fits
        self._read_from += len(data)
        if self._read_from == len(unread.data):
            self._unread.popleft()
            self._read_from = 0
        self._unread_bytes -= len(data)
        frames = self._parser.feed(data)
        if frames:
            self._ctx.stats.add("frames", "tap", self._mapper.source, len(frames))
            self._hold(frames, unread.at, unread.due)

    def _hold(self, frames: Sequence[RawFrame] | Sequence[Event], at: float, due: float) -> None:
        """Hold frames read together (or events) for the store; those beyond the queue's
        room are dropped."""
        room = self._ctx.queue_frames - self._held_frames
        if len(frames) > room:
            self._dropped(len(frames) - max(room, 0), "the tap's queue is full")
            frames = frames[: max(room, 0)]
        if frames:
            text = self._mapper.text_flags(frames)
            self._held.append(_Held(frames, text, at, due))
            self._held_frames += len(frames)
            if not self._flush and not all(text):
                self._flush = True

    def _due(self) -> bool:
        """Whether what is held is to be stored now: a frame that is not text, a full
        batch, the end with every byte read, or the first held frames' time came."""
        return bool(self._held) and (
            self._flush
            or self._held_frames >= self._ctx.batch_frames
            or (self._closed and not self._unread)
            or self._held[0].due <= self._loop.time()
        )

    async def _until_due(self) -> None:
        """Wait for the first held frames' time, or for more (bytes, frames, the end)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._held[0].due):
                await self._wake.wait()
        self._wake.clear()

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
        self._flush = self._flush and bool(self._held)
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
