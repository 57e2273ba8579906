"""A stream resuming far behind catches up from the store while ingest runs, uncut."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import orjson

from relay.appkeys import HUB
from tests.conftest import RelayFactory
from tests.test_ingest import signed
from tests.test_sse import frames, is_change
from tests.test_sse_resume import _all_changes, events

BEFORE = 600  # events stored before the client resumes


async def test_resuming_subscriber_under_steady_ingest_is_not_cut_off(
    start_relay: RelayFactory,
) -> None:
    """With a live buffer of 4 changes and ingest running during its replay, a stream
    resumed from the start reads the log up to the head and goes live on one connection,
    every change once and in order."""
    relay = await start_relay(sse={"buffer_changes": 4, "heartbeat_seconds": 0.2})
    bodies = [orjson.dumps(e) for e in events()]

    async def post(chunk: list[bytes]) -> None:
        await asyncio.gather(
            *(relay.client.post("/v1/ingest/casedev", data=b, headers=signed(b)) for b in chunk)
        )

    for start in range(0, BEFORE, 50):
        await post(bodies[start : start + 50])
    started = asyncio.Event()

    async def produce() -> None:
        await started.wait()
        for start in range(BEFORE, len(bodies), 4):
            await post(bodies[start : start + 4])

    producing = asyncio.create_task(produce())
    received: list[int] = []
    connections = 0
    final: int | None = None

    async def follow() -> None:
        nonlocal connections, final
        params = {"last_event_id": "0"}
        async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
            connections += 1
            started.set()
            async for frame in frames(resp):
                if is_change(frame):
                    received.append(int(frame["id"]))
                    await asyncio.sleep(0)  # a reader that takes its time
                if final is None and producing.done():
                    final = int((await _all_changes(relay))[-1]["id"])
                if final is not None and received and received[-1] >= final:
                    return

    await asyncio.wait_for(follow(), timeout=120)
    await producing
    expected = [int(c["id"]) for c in await _all_changes(relay)]
    assert connections == 1
    assert received == expected
    assert len(expected) > 1500


async def test_resumed_streams_of_one_session_or_exact_types_replay_just_those(
    start_relay: RelayFactory,
) -> None:
    """A stream of one session, or of exact type names, resumed from the start replays
    exactly the matching changes in id order, then says where the live part begins."""
    relay = await start_relay(sse={"heartbeat_seconds": 0.2})
    for body in (orjson.dumps(e) for e in events()[:200]):
        await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    everything = await _all_changes(relay)
    cases = [
        ("/v1/sessions/chat_03/stream", {}, lambda c: c["session_id"] == "chat_03"),
        ("/v1/stream", {"session_id": "chat_05"}, lambda c: c["session_id"] == "chat_05"),
        (
            "/v1/stream",
            {"type": "session.ready,turn.completed"},
            lambda c: c["type"] in ("session.ready", "turn.completed"),
        ),
    ]
    for path, params, wanted in cases:
        want = [int(c["id"]) for c in everything if wanted(c)]
        got: list[int] = []
        query = {**params, "last_event_id": "0"}
        async with relay.client.get(path, params=query, headers=relay.auth) as resp:
            assert resp.status == 200
            async for frame in frames(resp):
                if is_change(frame):
                    got.append(int(frame["id"]))
                if frame.get("event") == "stream.position":
                    break
        assert got == want
        assert len(want) > 5


async def test_a_client_that_stops_reading_while_catching_up_is_cut_off(
    start_relay: RelayFactory,
) -> None:
    """A stream whose client takes nothing while it replays, with ingest overflowing its
    live buffer, is closed within a few heartbeat intervals instead of waiting forever."""
    relay = await start_relay(
        sse={"buffer_changes": 4, "heartbeat_seconds": 0.2, "socket_send_buffer_bytes": 4096}
    )
    bodies = [orjson.dumps(e) for e in events()]
    for body in bodies[:300]:
        await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    url = relay.client.make_url("/v1/stream")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no room to read ahead
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.write(
        b"GET /v1/stream?last_event_id=0 HTTP/1.1\r\nHost: relay\r\n"
        b"Authorization: Bearer %s\r\n\r\n" % relay.key.encode()
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    for body in bodies[300:340]:  # the stream is stuck in its replay: its buffer overflows
        await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    try:
        hub = relay.client.app[HUB]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the stream ends, unread
            if not hub.subscribers:
                break
            await asyncio.sleep(0.02)
        assert hub.subscribers == 0
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(2**16), timeout=10):
                received += chunk
        assert b"stream.position" not in received  # it never reached the live part
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
