"""Text frames in a tapped stream: providers tell them from their bytes, a run of them is
read from its last frame, and they wait a moment to be stored with the frames after them
while any other frame is stored at once."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web

from relay.config import SourceSettings
from relay.connectors.frames import FrameMapper
from relay.connectors.sse import RawFrame, SSEParser
from relay.events import EventType
from relay.providers import Context, Provider, build_provider
from relay.providers.base import Frame, TextHints
from tests.conftest import RelayFactory
from tests.fake_upstreams import FIXTURES
from tests.test_tap import ServerFactory, eventually, tap_source

AT = datetime(2026, 12, 1, tzinfo=UTC)
STREAMS = [
    "casedev/respond_1.sse",
    "casedev/respond_2.sse",
    "casey/chat_1.sse",
    "casey/chat_2.sse",
    "casey/chat_3.sse",
    "llamacloud/stream_2.sse",
    "scriberr/run_1.sse",
    "scriberr/run_2.sse",
]
# Frames a provider must not call text: they carry state, or their type is unsure.
NOT_TEXT = {
    "casedev": [
        ("message.part.updated", b'{"part": {"type": "tool", "callID": "c1", "tool": "t"}}'),
        ("message.part.updated", b'{"part": {"type": "t\\u006fol", "callID": "c1"}}'),
        ("turn.completed", b'{"turnId": "t1"}'),
        (None, b'{"type": "turn.started", "part": {"type": "text"}}'),
    ],
    "casey": [
        (None, b'{"type": "token", "content": "a", "type": "done"}'),
        (None, b'{"type": "token", "content": "a", "\\u0074ype": "done"}'),
        (None, b'{"content": "a", "type": "token"}'),
        ("done", b'{"type": "token"}'),
    ],
    "llamacloud": [
        (None, b'{"type": "text_delta", "content": "a", "session_id": "other"}'),
        (None, b'{"type": "stop", "content": "text_delta"}'),
    ],
    "scriberr": [
        ("chat.run.completed", b'{"session_id": "s", "run_id": "r"}'),
        (None, b'{"type": "chat.run.failed", "session_id": "s"}'),
    ],
}


def provider_of(name: str) -> Provider:
    return build_provider(SourceSettings(id="s", provider=name, verify="none"))


def raw_frames(stream: str) -> list[RawFrame]:
    return SSEParser().feed((FIXTURES / stream).read_bytes() + b"\n\n")


@pytest.mark.parametrize("provider_name", sorted(NOT_TEXT))
def test_a_frame_called_text_only_gives_a_text_event(provider_name: str) -> None:
    """Every frame of the seed streams its provider calls text gives one activity event."""
    provider = provider_of(provider_name)
    assert isinstance(provider, TextHints)
    called = 0
    for stream in (s for s in STREAMS if s.startswith(provider_name + "/")):
        for i, raw in enumerate(raw_frames(stream)):
            if not provider.text_only(raw.name, raw.data):
                continue
            called += 1
            frame = Frame(i, orjson.loads(raw.data), raw.id, raw.name)
            events = provider.events([frame], Context("s", AT, "tap_1", "sess"))
            assert [(e.type, e.usage, e.tool_call_id) for e in events] == [
                (EventType.TURN_ACTIVITY, None, None)
            ], raw
    assert called > 0


@pytest.mark.parametrize("provider_name", sorted(NOT_TEXT))
def test_frames_that_carry_state_or_are_unsure_are_not_called_text(provider_name: str) -> None:
    """Tools, lifecycle frames, repeated or escaped `type` keys and sessions are read whole."""
    provider = provider_of(provider_name)
    assert isinstance(provider, TextHints)
    for name, data in NOT_TEXT[provider_name]:
        assert not provider.text_only(name, data), (name, data)


def test_a_run_of_text_frames_is_read_from_its_last_frame() -> None:
    """Of ten text frames between two others, only the last is read; indexes stay."""
    frames = [
        RawFrame(b'{"turnId": "t1"}', "turn.started", None, None),
        *[
            RawFrame(
                b'{"turnId": "t1", "part": {"type": "text", "text": "%d"}}' % i, "m", None, None
            )
            for i in range(10)
        ],
        RawFrame(b'{"turnId": "t1"}', "turn.completed", None, None),
    ]
    mapper = FrameMapper(provider_of("casedev"), "s", "tap_1", "sess")
    assert [f.index for f in mapper.read(frames)] == [0, 10, 11]
    assert [f.index for f in mapper.read(frames[1:3])] == [13]


@pytest.mark.parametrize("stream", STREAMS)
def test_reading_batches_from_their_text_runs_gives_the_events_of_every_frame(
    stream: str,
) -> None:
    """However a stream is cut into batches, reading runs from their last frame gives the
    same events, activity included, as reading every frame."""
    provider = provider_of(stream.split("/")[0])
    raw = raw_frames(stream)
    rng = random.Random(stream)
    for _ in range(30):
        skipping = FrameMapper(provider, "s", "tap_1", "sess")
        every = FrameMapper(provider, "s", "tap_1", "sess")
        cuts = sorted(rng.sample(range(1, len(raw)), min(3, len(raw) - 1)))
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            read = [every.frame(f.data, f.name, f.id) for f in raw[start:end]]
            expected = every.events([f for f in read if f is not None], AT)
            assert skipping.events(skipping.read(raw[start:end]), AT) == expected


def frame(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def held_stream(
    aiohttp_server: ServerFactory, start_relay: RelayFactory, text_delay: float
) -> tuple[Any, asyncio.Event, asyncio.Event]:
    """A Case.dev upstream that sends a turn's start, then text frames (once `more` is
    set), then waits for `end` to complete it; and a relay tapping it."""
    more, end = asyncio.Event(), asyncio.Event()
    ids = {"chatId": "chat_text", "turnId": "turn_t"}

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(frame("turn.started", **ids, occurred_at="2026-12-01T10:00:00Z"))
        await more.wait()
        for i in range(5):
            at = f"2026-12-01T10:00:0{i + 1}Z"
            part = {"type": "text", "text": str(i)}
            await response.write(frame("message.part.updated", **ids, part=part, occurred_at=at))
        await end.wait()
        await response.write(frame("turn.completed", **ids, occurred_at="2026-12-01T10:00:09Z"))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/agent/v1/chat/chat_text/respond", respond)
    server = await aiohttp_server(app)
    relay = await start_relay(
        sources=[tap_source("casedev", str(server.make_url("")).rstrip("/"))],
        connectors={"tap_text_delay_seconds": text_delay},
    )
    return relay, more, end


async def session(relay: Any) -> dict[str, Any] | None:
    resp = await relay.client.get("/v1/sessions/chat_text", headers=relay.auth)
    return None if resp.status != 200 else dict(await resp.json())


async def test_a_frame_that_is_not_text_is_stored_without_waiting_for_more(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A turn's start is stored while its stream is open, however long text may wait."""
    relay, more, end = await held_stream(aiohttp_server, start_relay, text_delay=60)
    async with relay.client.post("/v1/tap/casedev/agent/v1/chat/chat_text/respond") as resp:
        await resp.content.readany()
        started = await eventually(lambda: session(relay))
        assert started is not None
        assert started["last_turn"]["status"] == "running"
        more.set()
        end.set()
        await resp.read()
    done = await eventually(lambda: _completed(relay))
    assert done is not None
    assert done["last_event_at"].startswith("2026-12-01T10:00:09")


async def _completed(relay: Any) -> dict[str, Any] | None:
    found = await session(relay)
    return found if found is not None and found["last_turn"]["status"] == "completed" else None


async def test_text_frames_are_stored_after_the_delay_while_the_stream_is_open(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """Text frames alone move the turn's last activity within the delay, mid-stream."""
    relay, more, end = await held_stream(aiohttp_server, start_relay, text_delay=0.2)
    async with relay.client.post("/v1/tap/casedev/agent/v1/chat/chat_text/respond") as resp:
        await resp.content.readany()
        assert await eventually(lambda: session(relay)) is not None
        more.set()

        async def moved() -> bool:
            found = await session(relay)
            return found is not None and found["last_event_at"].startswith("2026-12-01T10:00:05")

        assert await eventually(moved), "the text frames were not stored mid-stream"
        end.set()
        await resp.read()
