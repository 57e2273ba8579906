"""A stream's frames, a batch at a time, as canonical events: provider state kept between.

Providers read all frames of a request at once (a Casey stream's session is in its first
frame, a LlamaCloud turn runs from a `user_input` to a `stop`). A connector sees a
stream in batches, so each batch is read after the frames kept from the batches before
it: those that gave an event of their own (turn starts and ends, tools), not those that
only carried text. Frames keep their index in the whole stream, so ids minted from it
(`{stream id}:{frame index}`) are those a forward of the whole stream gives; events
already handed over are not handed over again.

Most frames of a chat stream only carry text (tokens, deltas), and the text frames of
a batch only give their turn's last activity, the last one's. Where the provider can
tell such frames from their bytes (`TextHints`), a run of them is read from its last
frame alone: the others are not parsed at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from relay.connectors.sse import RawFrame
from relay.events import Event, EventType
from relay.normalize import InvalidEvent
from relay.pipeline import MAX_NESTING, nested_deeper_than
from relay.providers import Context, Frame, Provider
from relay.providers.canonical import encode
from relay.store import IngestRecord, Store

_FRAME = re.compile(r"^frame (\d+)")
_KEPT_MAX = 10_000  # frames kept for a stream's provider state, at most


@dataclass(slots=True)
class FrameMapper:
    """One stream's frames to events; `skipped` counts frames that gave no event."""

    provider: Provider
    source: str
    stream_id: str
    session_id: str | None = None
    skipped: int = 0
    _next_index: int = 0
    _kept: list[Frame] = field(default_factory=list)
    _handed: set[str] = field(default_factory=set)
    _text_only: Callable[[str | None, bytes], bool] | None = field(init=False)

    def __post_init__(self) -> None:
        # `TextHints`, read without a runtime protocol check (slow; one per stream).
        hint = getattr(self.provider, "text_only", None)
        self._text_only = hint if callable(hint) else None

    def text_flags(self, items: Sequence[RawFrame | Event]) -> list[bool]:
        """For each of `items`, whether the provider tells it is a frame that only
        carries text (never an event, nor anything without a provider's hints)."""
        text_only = self._text_only
        if text_only is None:
            return [False] * len(items)
        return [isinstance(item, RawFrame) and text_only(item.name, item.data) for item in items]

    def read(self, raws: Sequence[RawFrame], text: Sequence[bool] | None = None) -> list[Frame]:
        """The next frames of the stream, but those of a run of text frames before its
        last one (skipped, not counted) and those `frame` leaves out; `text` is
        `text_flags(raws)` if known."""
        if text is None:
            text = self.text_flags(raws)
        frames = []
        last = len(raws) - 1
        for i, raw in enumerate(raws):
            if i < last and text[i] and text[i + 1]:
                self._next_index += 1
                continue
            frame = self.frame(raw.data, raw.name, raw.id)
            if frame is not None:
                frames.append(frame)
        return frames

    def frame(self, data: bytes, name: str | None, frame_id: str | None) -> Frame | None:
        """The next frame of the stream, or None (counted) if its data is not a JSON
        object (`[DONE]`, a keep-alive)."""
        index = self._next_index
        self._next_index += 1
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or nested_deeper_than(data, payload, MAX_NESTING):
            self.skipped += 1
            return None
        return Frame(index, payload, frame_id, name)

    def events(self, batch: Sequence[Frame], received_at: datetime) -> list[Event]:
        """The events `batch` adds to what the stream gave so far."""
        if not batch:
            return []
        frames = [*self._kept, *batch]
        ctx = Context(self.source, received_at, self.stream_id, self.session_id)
        while True:
            try:
                events = self.provider.events(frames, ctx)
                break
            except InvalidEvent as exc:  # drop the frame it names and read the rest again
                match = _FRAME.match(exc.field)
                bad = int(match.group(1)) if match else None
                left = [f for f in frames if f.index != bad] if bad is not None else []
                self.skipped += len(frames) - len(left)
                frames = left
                if not frames:
                    return []
        new = [e for e in events if e.id not in self._handed]
        self._handed.update(e.id for e in new)
        if self.session_id is None:
            self.session_id = next((e.session_id for e in events if e.session_id), None)
        self._keep(frames, events)
        return new

    def _keep(self, frames: list[Frame], events: list[Event]) -> None:
        own = {
            e.id.partition(":ready")[0]
            for e in events
            if e.type != EventType.TURN_ACTIVITY or e.usage is not None
        }
        prefix = f"{self.stream_id}:"
        self._kept = [f for f in frames if (f.id or f"{prefix}{f.index}") in own][-_KEPT_MAX:]


def records(events: Sequence[Event], received_at: datetime) -> list[IngestRecord]:
    return [IngestRecord(event, encode(event), received_at) for event in events]


async def store_events(store: Store, events: Sequence[Event], received_at: datetime) -> int:
    """Store events (in one transaction); how many were new."""
    if not events:
        return 0
    results = await store.ingest_many(records(events, received_at))
    return sum(not r.duplicate for r in results)
