"""Server-Sent Events: real SSE clients, resume without gap or repeat, slow consumers."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import ClientResponse
from httpx_sse import aconnect_sse

from relay.appkeys import HUB
from tests.conftest import LIFECYCLE_CHANGES, Relay, RelayFactory, fixture_events
from tests.receivers import eventually
from tests.test_ingest import signed
from tests.test_read_api import get, ingest


async def frames(resp: ClientResponse) -> AsyncIterator[dict[str, str]]:
    """Parse an SSE stream read with aiohttp's client into frames (comments included)."""
    frame: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(": ")
            frame[field] = value


def is_change(frame: dict[str, str]) -> bool:
    """A change frame, not a `stream.*` control event or a comment."""
    return "data" in frame and not frame.get("event", "").startswith("stream.")


async def read_changes(resp: ClientResponse, count: int) -> list[dict[str, str]]:
    got: list[dict[str, str]] = []
    async for frame in frames(resp):
        if is_change(frame):
            got.append(frame)
            if len(got) == count:
                break
    return got


async def collect_changes(resp: ClientResponse, into: list[dict[str, str]]) -> None:
    async for frame in frames(resp):
        if is_change(frame):
            into.append(frame)


async def test_httpx_sse_client_receives_the_lifecycle_in_order(relay: Relay) -> None:
    """The httpx-sse client library receives every change of the fixture, in id order."""
    url = str(relay.client.make_url("/v1/stream"))
    received: list[Any] = []
    async with (
        httpx.AsyncClient(headers=relay.auth, timeout=10) as http,
        aconnect_sse(http, "GET", url) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["cache-control"] == "no-cache, no-transform"
        assert source.response.headers["x-accel-buffering"] == "no"
        assert source.response.headers["x-request-id"]
        for event in fixture_events():
            await ingest(relay, event)
        retry = None
        async for sse in source.aiter_sse():
            retry = retry or sse.retry
            if not sse.event.startswith("stream."):
                received.append(sse)
            if len(received) == len(LIFECYCLE_CHANGES):
                break
    assert [sse.event for sse in received] == LIFECYCLE_CHANGES
    ids = [int(sse.id) for sse in received]
    assert ids == sorted(ids)
    assert retry == 3000
    completed = received[LIFECYCLE_CHANGES.index("turn.completed")]
    assert orjson.loads(completed.data)["turn"]["status"] == "completed"


async def test_resume_replays_the_rest_exactly_once(relay: Relay) -> None:
    """Reconnecting with Last-Event-ID (or ?last_event_id=) gets every later change once."""
    for event in fixture_events():
        await ingest(relay, event)
    changes = (await get(relay, "/v1/changes"))["items"]
    resume_from = changes[2]["id"]
    headers = {**relay.auth, "Last-Event-ID": str(resume_from)}
    async with relay.client.get("/v1/stream", headers=headers) as resp:
        got = await read_changes(resp, len(changes) - 3)
    assert [int(f["id"]) for f in got] == [c["id"] for c in changes[3:]]
    params = {"last_event_id": str(changes[-2]["id"]), "access_token": relay.key}
    async with relay.client.get("/v1/stream", params=params) as resp:
        got = await read_changes(resp, 1)
        await ingest(relay, {**fixture_events()[3], "id": "evt_again", "data": {"chatId": "c2"}})
        got += await read_changes(resp, 2)
    assert [f["event"] for f in got] == ["turn.failed", "session.created", "session.ready"]


async def test_replay_and_live_meet_without_gap_or_repeat(relay: Relay) -> None:
    """Changes made while a resumed stream replays arrive once, after the replayed ones."""
    events = fixture_events()
    for event in events[:4]:
        await ingest(relay, event)
    headers = {**relay.auth, "Last-Event-ID": "0"}
    async with relay.client.get("/v1/stream", headers=headers) as resp:
        rest = asyncio.gather(*(ingest(relay, event) for event in events[4:]))
        got = await read_changes(resp, len(LIFECYCLE_CHANGES))
        await rest
    ids = [int(f["id"]) for f in got]
    assert ids == await change_ids(relay)
    assert [f["event"] for f in got] == LIFECYCLE_CHANGES


async def test_filters_by_type_and_session(relay: Relay) -> None:
    """type and session_id filters (exact or glob) select what a stream carries."""
    for event in fixture_events():
        await ingest(relay, event)
    await ingest(relay, {**fixture_events()[0], "id": "evt_other", "data": {"chatId": "other"}})
    params = {"type": "turn.c*,session.ready", "last_event_id": "0"}
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        got = await read_changes(resp, 3)
    assert [f["event"] for f in got] == ["session.ready", "turn.completed", "turn.conflict"]
    path = "/v1/sessions/other/stream"
    async with relay.client.get(path, params={"last_event_id": "0"}, headers=relay.auth) as resp:
        got = await read_changes(resp, 1)
    assert orjson.loads(got[0]["data"])["session_id"] == "other"
    resp = await relay.client.get("/v1/sessions/missing/stream", headers=relay.auth)
    assert resp.status == 404


async def test_heartbeats_keep_an_idle_stream_alive(start_relay: RelayFactory) -> None:
    """An idle stream gets `:` comment heartbeats at the configured interval."""
    relay = await start_relay(sse={"heartbeat_seconds": 0.2})
    async with relay.client.get("/v1/stream", headers=relay.auth) as resp:
        seen = []
        async for frame in frames(resp):
            seen.append(frame)
            if frame.get("comment") == "heartbeat":
                break
    assert any(frame.get("retry") == "3000" for frame in seen)


async def test_overflowing_subscriber_is_disconnected_and_can_resume(
    start_relay: RelayFactory,
) -> None:
    """A stream that stops reading is cut off once its byte budget is spent; it resumes
    from its last id without losing anything."""
    from tests.test_sse_slow import open_stalled_stream

    relay = await start_relay(sse={"buffer_bytes": 4096, "socket_send_buffer_bytes": 4096})
    hub = relay.client.app[HUB]
    stalled = await open_stalled_stream(relay)
    await eventually(lambda: hub.subscribers == 1)
    burst = [
        {**fixture_events()[0], "id": f"evt_burst_{n}", "data": {"chatId": f"chat_{n}"}}
        for n in range(200)
    ]
    for start in range(0, len(burst), 20):
        await asyncio.gather(*(ingest(relay, event) for event in burst[start : start + 20]))
    assert hub.subscribers == 0  # cut off instead of buffering without bound
    stalled.close()
    params = {"last_event_id": "0"}
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        got = await read_changes(resp, 200)
    assert [int(f["id"]) for f in got] == await change_ids(relay)
    assert len(got) == 200


async def test_bad_stream_requests(relay: Relay) -> None:
    """No key is 401; a non-numeric Last-Event-ID is 400 INVALID_PARAMETER."""
    assert (await relay.client.get("/v1/stream")).status == 401
    resp = await relay.client.get("/v1/stream", headers={**relay.auth, "Last-Event-ID": "abc"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


@pytest.mark.parametrize("path", ["/v1/stream"])
async def test_shutdown_ends_streams_cleanly(start_relay: RelayFactory, path: str) -> None:
    """When the relay shuts down, open streams end (EOF), so clients reconnect."""
    relay = await start_relay()
    resp = await relay.client.get(path, headers=relay.auth)
    first = await resp.content.readline()
    assert first == b"retry: 3000\n"
    closing = asyncio.create_task(relay.client.server.close())
    rest = await asyncio.wait_for(resp.content.read(), timeout=10)
    assert rest == b'id: 0\nevent: stream.position\ndata: {"id": 0}\n\n'
    await closing


async def test_relay_tail_prints_readable_lines_and_resumes(relay: Relay) -> None:
    """`relay tail` shows one line per change and, given --from, resumes after that id."""
    for event in fixture_events():
        await ingest(relay, event)
    url = str(relay.client.make_url("/")).rstrip("/")
    after = str((await change_ids(relay))[LIFECYCLE_CHANGES.index("turn.completed")])
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "tail"),
        *("--url", url, "--key", relay.key, "--from", after, "--count", "3", "--type", "turn.*"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 3
    assert "turn.started" in lines[0]
    assert "turn=turn_002" in lines[0]
    assert "status=conflict" in lines[1]
    assert "error='vault search timed out'" in lines[2]


def test_streams_started_after_shutdown_began_end_at_once() -> None:
    """A subscription made after the hub closed is closed from the start (no hang)."""
    from relay.hub import InProcessHub

    hub = InProcessHub()
    hub.close()
    with hub.subscribe(lambda change: True, 10, lambda: None) as subscription:
        assert subscription.closed


async def until_no_streams(base_url: str, within: float = 30.0) -> None:
    """Wait until the relay's metrics count no open stream."""
    deadline = asyncio.get_running_loop().time() + within
    async with httpx.AsyncClient() as http:
        while "relay_sse_subscribers 0.0" not in (await http.get(f"{base_url}/metrics")).text:
            assert asyncio.get_running_loop().time() < deadline, "a stream stayed open"
            await asyncio.sleep(0.02)


async def test_client_disconnect_is_not_a_server_error(tmp_path: Any) -> None:
    """In `relay serve`, a stream whose client leaves ends quietly: no 500, no traceback."""
    from tests.test_crash import free_port, write_config

    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(
        config.read_text().replace('level = "warning"', 'level = "info"')
        + "[auth]\nenabled = false\n[sse]\nheartbeat_seconds = 0.1\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "serve", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        for _ in range(600):  # a `relay serve` starting on a loaded machine: up to 60 s
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: relay\r\n\r\n")
        await reader.readuntil(b"retry: ")
        writer.close()
        await until_no_streams(f"http://127.0.0.1:{port}")  # the stream's handler has ended
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0
    assert b"request.failed" not in output
    assert b"Traceback" not in output


async def test_position_frame_lets_a_live_only_client_resume_without_gap(relay: Relay) -> None:
    """A stream without Last-Event-ID sends its starting position as a stream.position
    event with an id, so a client that disconnects before any change resumes with no gap."""
    await ingest(relay, fixture_events()[0])
    async with relay.client.get("/v1/stream", headers=relay.auth) as resp:
        position = None
        async for frame in frames(resp):
            if "id" in frame:
                position = frame["id"]
                break
    everything = await relay.client.get("/v1/changes", params={"type": "*"}, headers=relay.auth)
    assert position == str((await everything.json())["items"][-1]["id"])  # the newest change
    await ingest(relay, fixture_events()[3])  # while the client is away
    params = {"last_event_id": position}
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        got = await read_changes(resp, 1)
    assert [f["event"] for f in got] == ["session.ready"]


async def test_head_on_a_stream_is_405(relay: Relay) -> None:
    """HEAD on a stream is refused rather than answered with an endless body."""
    resp = await relay.client.head("/v1/stream", headers=relay.auth)
    assert resp.status == 405


async def test_gone_client_leaves_the_hub_without_handler_cancellation(tmp_path: Any) -> None:
    """Even where aiohttp does not cancel handlers, a stream whose client left ends."""
    from aiohttp import web

    from relay.app import create_app
    from tests.conftest import make_settings
    from tests.test_crash import free_port

    settings = make_settings(tmp_path, auth={"enabled": False}, sse={"heartbeat_seconds": 0.05})
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: relay\r\n\r\n")
        await reader.readuntil(b"retry: ")
        assert app[HUB].subscribers == 1
        writer.close()
        for _ in range(600):  # up to 30 s
            if app[HUB].subscribers == 0:
                break
            await asyncio.sleep(0.05)
        assert app[HUB].subscribers == 0
    finally:
        await runner.cleanup()


async def change_ids(relay: Relay) -> list[int]:
    """Ids of the changes a default filter sees (all but raw events), in order."""
    resp = await relay.client.get("/v1/changes", params={"limit": 1000}, headers=relay.auth)
    assert resp.status == 200
    return [change["id"] for change in (await resp.json())["items"]]


async def test_raw_events_only_for_filters_that_name_them(relay: Relay) -> None:
    """raw.* changes carry each stored event; streams and /v1/changes get them only on request."""
    events = fixture_events()
    for event in events:
        await ingest(relay, event)
    await ingest(relay, events[0])  # a duplicate makes no raw change
    params = {"last_event_id": "0", "type": "raw.*"}
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        got = await read_changes(resp, len(events))
    assert [f["event"] for f in got] == [f"raw.{e['type']}" for e in events]
    first = orjson.loads(got[0]["data"])
    assert first["event"] == events[0]
    assert first["cause"] == {
        "event_id": events[0]["id"],
        "source": "casedev",
        "type": events[0]["type"],
    }
    assert (first["session"], first["turn"]) == (None, None)

    resp = await relay.client.get("/v1/changes", params={"type": "raw.*"}, headers=relay.auth)
    raw = (await resp.json())["items"]
    assert [c["id"] for c in raw] == [int(f["id"]) for f in got]
    default = await change_ids(relay)
    assert not set(default) & {c["id"] for c in raw}
    everything = await relay.client.get("/v1/changes", params={"type": "*"}, headers=relay.auth)
    assert len((await everything.json())["items"]) == len(default) + len(raw)


async def test_raw_changes_replay_exactly_as_sent_live(relay: Relay, tmp_path: Path) -> None:
    """A raw change is kept once, in its event's row, yet replays (SSE, /v1/changes) byte for
    byte as it was streamed live; a payload spread over several lines is kept on one."""
    params = {"type": "raw.*"}
    live: list[dict[str, str]] = []
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        reading = asyncio.create_task(collect_changes(resp, live))
        events = fixture_events()[:3]
        for event in events:
            await ingest(relay, event)
        spread = {**fixture_events()[3], "id": "evt_spread_over_lines"}
        body = orjson.dumps(spread, option=orjson.OPT_INDENT_2)
        assert b"\n" in body
        resp_spread = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        assert resp_spread.status == 202
        for _ in range(1500):  # at least 30 s
            if len(live) == 4:
                break
            await asyncio.sleep(0.02)
        reading.cancel()
    assert [orjson.loads(f["data"])["event"]["id"] for f in live] == [
        *(e["id"] for e in events),
        "evt_spread_over_lines",
    ]
    async with relay.client.get(
        "/v1/stream", params={**params, "last_event_id": "0"}, headers=relay.auth
    ) as resp:
        replayed = await read_changes(resp, 4)
    assert [f["data"] for f in replayed] == [f["data"] for f in live]
    listed = await get(relay, "/v1/changes", type="raw.*")
    assert [orjson.dumps(c) for c in listed["items"]] == [f["data"].encode() for f in live]
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        rows = conn.execute("SELECT body FROM changes WHERE type GLOB 'raw.*' ORDER BY id")
        stored = [len(body) for (body,) in rows]
    conn.close()
    assert stored[:3] == [0, 0, 0]  # rebuilt from the events table
    assert stored[3] > 0  # re-encoded on one line, so kept


async def test_a_commit_whose_answer_was_lost_still_reaches_streams_in_order(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """A batch committed without its answer reaching the relay (a writer process that ended
    in between) leaves changes the relay never announced; they reach live streams, in id
    order, before the changes of the next commit, so a stream has no gap."""
    from datetime import UTC, datetime

    from relay.normalize import decoder, normalise_casedev
    from relay.store import IngestRecord
    from relay.store.sqlite_writer import BatchWriter

    relay = await start_relay()
    events = fixture_events()
    await ingest(relay, events[0])
    async with relay.client.get("/v1/stream", headers=relay.auth) as resp:
        position = b'data: {"id": 2}\n\n'
        assert (await resp.content.readuntil(position)).endswith(position)
        # The lost commit: events[1] (a runtime reused) written by a writer of our own.
        with sqlite3.connect(tmp_path / "relay.db", isolation_level=None) as conn:
            writer = BatchWriter(conn, decoder({"casedev": "casedev"}), 600, 120)
            body, now = orjson.dumps(events[1]), datetime.now(UTC)
            event = normalise_casedev("casedev", orjson.loads(body), now)
            writer.write([IngestRecord(event, body, now)])
        conn.close()
        await ingest(relay, events[2])  # a scope activated, through the relay
        got = await asyncio.wait_for(read_changes(resp, 2), timeout=10)
    assert [(f["id"], f["event"]) for f in got] == [
        ("4", "session.provisioning"),  # 3 is the lost event's raw change
        ("6", "session.provisioning"),
    ]
    assert orjson.loads(got[0]["data"])["cause"]["event_id"] == events[1]["id"]
