"""The tap's reading of chunks: SSE lines however the bytes are split, and the frames of
one chunk queued together, beyond the queue's room dropped while the stream flows on."""

from __future__ import annotations

import random

from aiohttp import web

from relay.connectors.sse import RawFrame, SSEParser
from tests.conftest import RelayFactory
from tests.test_tap import ServerFactory, eventually, metric, tap_source

BODY = (
    b': hello\r\nevent: a\r\nid: 1\r\ndata: {"n": 1}\r\n\r\n'
    b"data: x\rdata: y\r\r"
    b'event: b\ndata: {"n": 3}\n\n'
    b"retry: 5\nid\ndata: [DONE]\r\n\n"
)
FRAMES = [
    RawFrame(b'{"n": 1}', "a", "1", "1"),
    RawFrame(b"x\ny", None, None, "1"),
    RawFrame(b'{"n": 3}', "b", None, "1"),
    RawFrame(b"[DONE]", None, None, None),
]


def read(chunks: list[bytes]) -> list[RawFrame]:
    parser = SSEParser()
    return [frame for chunk in chunks for frame in parser.feed(chunk)]


def test_frames_are_the_same_however_the_bytes_are_split() -> None:
    """CR, LF and CRLF lines give the same frames whole, a byte at a time or cut anywhere."""
    rng = random.Random(7)
    assert read([BODY]) == FRAMES
    assert read([BODY[i : i + 1] for i in range(len(BODY))]) == FRAMES
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(BODY)), rng.randint(1, 8)))
        chunks = [BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(BODY)], strict=True)]
        assert read(chunks) == FRAMES


def test_a_line_longer_than_the_limit_is_dropped_and_the_next_frame_read() -> None:
    """A line past 1 MiB, sent in pieces without an end, is dropped; the stream reads on."""
    piece = b"x" * 65536
    chunks = [b"data: ", *[piece] * 17, b"\n\ndata: after\n\n"]
    assert [frame.data for frame in read(chunks)] == [b"after"]


async def test_frames_beyond_the_queue_are_dropped_and_the_stream_flows(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A chunk of more frames than the tap may queue: the rest counted, every byte passed."""
    frames = [
        b'event: turn.started\ndata: {"chatId": "chat_q", "turnId": "t1"}\n\n',
        *[b'data: {"chatId": "chat_q", "turnId": "t1", "text": "%d"}\n\n' % i for i in range(40)],
    ]
    body = b"".join(frames)

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)  # one chunk
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/agent/v1/chat/chat_q/respond", respond)
    server = await aiohttp_server(app)
    upstream = str(server.make_url("")).rstrip("/")
    relay = await start_relay(
        sources=[tap_source("casedev", upstream)], connectors={"tap_queue_frames": 4}
    )
    async with relay.client.post("/v1/tap/casedev/agent/v1/chat/chat_q/respond") as resp:
        assert await resp.read() == body
    labels = 'connector="tap",source="casedev"'
    dropped = await eventually(
        lambda: metric(relay, "relay_connector_store_failures_total", labels)
    )
    assert dropped == len(frames) - 4
