"""Slow consumers: a stream that stops reading is cut off, and nobody else waits for it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import orjson

from relay.appkeys import HUB
from tests.conftest import Relay, RelayFactory
from tests.receivers import eventually
from tests.test_ingest import signed
from tests.test_sse import frames, is_change

SLOW = 20
FAST = 5
EVENTS = 600


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


async def open_stalled_stream(relay: Relay) -> socket.socket:
    """A stream whose client never reads: a tiny receive buffer that fills at once."""
    server = relay.client.server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    request = f"GET /v1/stream HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {relay.key}\r\n\r\n"
    await asyncio.get_running_loop().sock_sendall(sock, request.encode())
    return sock


async def test_stalled_streams_are_cut_off_and_others_stay_fast(
    start_relay: RelayFactory,
) -> None:
    """Stalled streams are disconnected once their buffer is full, memory stays bounded,
    and the streams that read keep getting every change without waiting for them."""
    relay = await start_relay(sse={"buffer_bytes": 64 * 1024})
    hub = relay.client.app[HUB]
    stalled = [await open_stalled_stream(relay) for _ in range(SLOW)]
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    async def reader(ready: asyncio.Event) -> int:
        count = 0
        async with relay.client.get("/v1/stream", headers=relay.auth) as resp:
            ready.set()
            async for frame in frames(resp):
                if not is_change(frame):
                    continue
                change = orjson.loads(frame["data"])
                latencies.append(time.monotonic() - sent_at[change["cause"]["event_id"]])
                count += 1
                if count == EVENTS:
                    return count
        return count

    ready = [asyncio.Event() for _ in range(FAST)]
    readers = [asyncio.create_task(reader(r)) for r in ready]
    for r in ready:
        await r.wait()
    await eventually(lambda: hub.subscribers == SLOW + FAST)

    before = rss_bytes()
    padding = "x" * 16000  # stored with the event, not sent in the change frames
    for n in range(EVENTS):
        event = {
            "id": f"evt_slow_{n}",
            "type": "agent.chat.session.created",
            "occurred_at": "2026-11-20T09:00:00.000Z",
            "data": {"chatId": f"chat_{n}", "note": padding},
        }
        body = orjson.dumps(event)
        sent_at[event["id"]] = time.monotonic()
        resp = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        assert resp.status == 202
    counts = await asyncio.wait_for(asyncio.gather(*readers), timeout=60)
    growth = rss_bytes() - before

    assert counts == [EVENTS] * FAST  # every change reached every reading stream
    assert hub.subscribers == FAST  # all stalled streams were cut off
    # Generous bounds (the benches measure the real figures): nobody waited for the
    # stalled streams, and memory did not grow with what they failed to read.
    latencies.sort()
    assert latencies[int(len(latencies) * 0.99)] < 2.0
    assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
    for sock in stalled:
        sock.close()
