"""Passing chunks on before reading frames: a feed reads its bytes a slice at a time in
the lane's slots (or at once past its byte cap), and a tapped stream reaches its caller
while no slot comes."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from relay.config import SourceSettings
from relay.connectors import feed as feed_module
from relay.connectors.feed import FeedContext, TapFeed, finish_feeds
from relay.connectors.frames import FrameMapper
from relay.connectors.lane import Lane
from relay.connectors.sse import SSEParser
from relay.connectors.stats import ConnectorStats
from relay.events import Event
from relay.logs import RepeatedWarnings
from relay.providers import build_provider
from relay.store import IngestRecord, Store
from tests.conftest import RelayFactory
from tests.fake_upstreams import FIXTURES, STREAMS, ChatPlatform
from tests.test_tap import (
    SESSIONS,
    ServerFactory,
    eventually,
    last_turn,
    lifecycle,
    metric,
    tap_source,
)

AT = datetime(2026, 12, 1, tzinfo=UTC)


# -- a feed --------------------------------------------------------------------------------


class KeptStore:
    """A store that keeps the events it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def ingest_many(self, records: Sequence[IngestRecord]) -> list[Any]:
        self.events.extend(record.event for record in records)
        return [SimpleNamespace(duplicate=False) for _ in records]


class HeldLane(Lane):
    """A lane that grants no slot until `release`d."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    async def turn(self) -> None:
        await self.released.wait()
        await super().turn()


def feed_for(provider: str, **options: Any) -> tuple[TapFeed, FeedContext, KeptStore]:
    store = KeptStore()
    settings = {"queue_frames": 100_000, "batch_frames": 256, "queue_bytes": 1 << 20}
    ctx = FeedContext(
        cast(Store, store),
        ConnectorStats(),
        RepeatedWarnings(),
        lambda: AT.timestamp(),
        **{**settings, **options},
    )
    source = SourceSettings(id="s", provider=provider, verify="none")
    mapper = FrameMapper(build_provider(source), "s", "tap_1", "sess")
    return TapFeed(ctx, mapper), ctx, store


def frames_read(ctx: FeedContext) -> int:
    return ctx.stats.counts[("frames", "tap", "s")]


def cut(body: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(body)), 12))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@pytest.mark.parametrize("stream", ["casedev/respond_1.sse", "casey/chat_1.sse"])
async def test_a_feed_read_in_slices_stores_the_events_of_the_whole_stream(
    stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks cut anywhere and read a few bytes per slot give the frames and the events
    of the whole stream, all stored once the stream ends."""
    monkeypatch.setattr(feed_module, "_SLICE_BYTES", 7)
    body = (FIXTURES / stream).read_bytes() + b"\n\n"
    provider = stream.split("/")[0]
    raw = SSEParser().feed(body)
    source = SourceSettings(id="s", provider=provider, verify="none")
    mapper = FrameMapper(build_provider(source), "s", "tap_1", "sess")
    whole = mapper.events(mapper.read(raw), AT)
    for seed in range(3):
        feed, ctx, store = feed_for(provider, text_delay=60)
        for chunk in cut(body, random.Random(seed)):
            feed.append(chunk)
        feed.close()
        await finish_feeds(ctx.tasks, grace=30)
        assert frames_read(ctx) == len(raw)
        assert lifecycle(store.events) == lifecycle(whole)
        assert len({event.id for event in store.events}) == len(store.events)


async def test_past_its_byte_cap_a_feed_reads_the_oldest_bytes_at_once() -> None:
    """With no slot coming, bytes wait unread up to the cap; past it, the oldest are read
    as more come (no more than needed), and the rest once slots come."""
    lane = HeldLane()
    feed, ctx, store = feed_for("casey", queue_bytes=100, lane=lane)
    frame = b'data: {"type": "token", "content": "%02d"}\n\n'
    assert len(frame % 0) == 42  # two fit under the cap, three do not
    feed.append(frame % 0)
    feed.append(frame % 1)
    assert frames_read(ctx) == 0
    feed.append(frame % 2)  # 126 bytes unread: the first chunk is read
    assert frames_read(ctx) == 1
    feed.append(frame % 3 + frame % 4)  # 168: two more
    assert frames_read(ctx) == 3
    feed.close()
    lane.released.set()
    await finish_feeds(ctx.tasks, grace=30)
    assert frames_read(ctx) == 5
    assert store.events, "the frames were not stored"


# -- a tapped stream -----------------------------------------------------------------------


async def test_a_tapped_stream_reaches_its_caller_while_its_frames_wait_to_be_read(
    aiohttp_server: ServerFactory,
    start_relay: RelayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the lane granting nothing, every byte still reaches the caller, the stream
    ends and nothing is read; once slots come, the frames are read and stored."""
    released = asyncio.Event()
    turn = Lane.turn

    async def held_turn(lane: Lane) -> None:
        await released.wait()
        await turn(lane)

    monkeypatch.setattr(Lane, "turn", held_turn)
    platform = ChatPlatform()
    server = await aiohttp_server(platform.app())
    relay = await start_relay(sources=[tap_source("casey", str(server.make_url("")).rstrip("/"))])
    path, file = STREAMS["casey"]
    async with asyncio.timeout(20):
        resp = await relay.client.post(f"/v1/tap/casey/{path}", json={})
        assert await resp.read() == file.read_bytes()
    labels = 'connector="tap",source="casey"'
    assert await metric(relay, "relay_connector_frames_total", labels) == 0
    assert await last_turn(relay, SESSIONS["casey"]) is None
    released.set()
    turn_done = await eventually(lambda: completed(relay, SESSIONS["casey"]))
    assert turn_done is not None, "the frames were not stored once slots came"
    assert await metric(relay, "relay_connector_frames_total", labels) > 0


async def completed(relay: Any, session: str) -> dict[str, Any] | None:
    turn = await last_turn(relay, session)
    return turn if turn is not None and turn["status"] == "completed" else None


async def test_a_gzip_stream_passes_compressed_and_its_frames_are_stored(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A gzip answer reaches the caller as sent; its frames are read decompressed."""
    body = STREAMS["casey"][1].read_bytes()
    compress = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    chunks = [
        compress.compress(piece) + compress.flush(zlib.Z_SYNC_FLUSH)
        for piece in (body[i : i + 300] for i in range(0, len(body), 300))
    ]
    chunks.append(compress.flush())

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", respond)
    server = await aiohttp_server(app)
    relay = await start_relay(sources=[tap_source("casey", str(server.make_url("")).rstrip("/"))])
    async with relay.client.post("/v1/tap/casey/api/chat", auto_decompress=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == b"".join(chunks)
    turn = await eventually(lambda: completed(relay, SESSIONS["casey"]))
    assert turn is not None, "the gzip stream's turn was not stored"
    assert turn["tool_calls"]["count"] == 1
