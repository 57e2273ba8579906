"""Hardening: bounded work before authentication, safe frames, exact streams."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from httpx_sse import ServerSentEvent, aconnect_sse
from httpx_sse._decoders import SSEDecoder
from multidict import CIMultiDict

from relay.app import create_app
from relay.appkeys import STORE
from relay.auth import READ, create_key
from relay.changes import StoredChange
from relay.config import SourceSettings
from relay.server import app_runner
from relay.verify import MAX_SIGNATURE_ENTRIES, VerificationError, Verifier, verify_signature
from tests.conftest import (
    ED25519_KEY,
    LIFECYCLE_CHANGES,
    Relay,
    RelayFactory,
    fixture_events,
    make_settings,
    source_table,
)
from tests.test_crash import free_port
from tests.test_ingest import post, signed
from tests.test_read_api import get, ingest
from tests.test_sse import frames, read_changes

BODY = b'{"id":"evt_1","type":"agent.worker.ready","data":{"chatId":"chat_1"}}'


class CountingKey:
    """A real ed25519 public key that counts the verifications asked of it."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key
        self.calls = 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.calls += 1
        self.key.verify(signature, data)


def counting_verifier() -> tuple[Verifier, CountingKey]:
    casedev = next(s for s in source_table() if s["id"] == "casedev")
    verifier = Verifier.from_settings(SourceSettings(**casedev))
    key = CountingKey(ED25519_KEY.public_key())
    return dataclasses.replace(verifier, public_keys=(key,)), key  # type: ignore[arg-type]


def v1a_headers(ts: int, entries: int) -> CIMultiDict[str]:
    forged = "v1a," + base64.b64encode(bytes(64)).decode()
    return CIMultiDict(
        {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(ts),
            "webhook-signature": " ".join([forged] * entries),
        }
    )


def refusal(verifier: Verifier, headers: CIMultiDict[str], now: float) -> VerificationError:
    try:
        verify_signature(verifier, BODY, headers, now)
    except VerificationError as exc:
        return exc
    raise AssertionError("the request was accepted")


def test_a_thousand_v1a_entries_are_refused_without_verifying_them() -> None:
    """A signature header with 1000 v1a entries is INVALID_SIGNATURE after no verification."""
    verifier, key = counting_verifier()
    now = time.time()
    error = refusal(verifier, v1a_headers(int(now), 1000), now)
    assert error.code == "INVALID_SIGNATURE"
    assert f"at most {MAX_SIGNATURE_ENTRIES}" in error.message
    assert key.calls == 0
    error = refusal(verifier, v1a_headers(int(now), MAX_SIGNATURE_ENTRIES), now)
    assert error.code == "INVALID_SIGNATURE"
    assert key.calls == MAX_SIGNATURE_ENTRIES  # up to the bound, each entry is tried


def test_a_stale_timestamp_is_refused_before_any_verification() -> None:
    """A timestamp out of tolerance is refused before any signature is verified."""
    verifier, key = counting_verifier()
    now = time.time()
    error = refusal(verifier, v1a_headers(int(now) - 3600, 2), now)
    assert error.code == "TIMESTAMP_OUT_OF_TOLERANCE"
    assert key.calls == 0


def sse_events(stream: bytes) -> list[dict[str, str]]:
    """The events an SSE client dispatches from `stream` (the WHATWG parsing rules)."""
    events: list[dict[str, str]] = []
    event: dict[str, str] = {}
    for line in re.split(r"\r\n|\r|\n", stream.decode()):
        if not line:
            if "data" in event:
                events.append(event)
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = event[name] + "\n" + value if name == "data" and name in event else value
    return events


HOSTILE = [
    "x\nid: 999\nevent: forged\ndata: {}\n\nevent: another",
    "x\rdata: {}\r\rid: 7",
    "x\r\n\r\nevent: forged",
    "x\x00y",
    "x\x85y",
]


@pytest.mark.parametrize(
    ("field", "where"), [("type", ""), ("id", ""), ("chatId", "data"), ("turnId", "data")]
)
@pytest.mark.parametrize("value", HOSTILE)
async def test_control_characters_in_types_and_ids_are_refused(
    relay: Relay, field: str, where: str, value: str
) -> None:
    """A type or id with a control character is 400 INVALID_EVENT naming the field."""
    event: dict[str, Any] = {
        "id": "evt_ctl",
        "type": "agent.worker.ready",
        "data": {"chatId": "chat_ctl", "turnId": "turn_1"},
    }
    (event[where] if where else event)[field] = value
    body = orjson.dumps(event)
    status, answer = await post(relay, body, signed(body))
    assert status == 400
    assert answer["error"]["code"] == "INVALID_EVENT"
    assert answer["error"]["message"].startswith(f"{field}: ")
    assert "control characters" in answer["error"]["message"]


@pytest.mark.parametrize("value", HOSTILE)
def test_the_frame_encoder_never_emits_more_than_one_event(value: str) -> None:
    """A change with a hostile type or data is still exactly one SSE event, its own."""
    change = StoredChange(42, "raw." + value, "chat_1", None, b'{"a":\n"b"\r}')
    events = sse_events(change.frame)
    assert len(events) == 1
    assert events[0]["id"] == "42"
    assert orjson.loads(events[0]["data"]) == {"a": "b"}
    assert "\n" not in events[0]["event"]
    assert "\r" not in events[0]["event"]


async def stream_ids(relay: Relay, type_filter: str, newest: int) -> set[int]:
    """Ids of the changes a stream resumed from 0 replays for `type_filter`."""
    ids: set[int] = set()
    params = {"type": type_filter, "last_event_id": "0"}
    async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
        assert resp.status == 200
        async for frame in frames(resp):
            change = "data" in frame and not frame.get("event", "").startswith("stream.")
            if change:
                ids.add(int(frame["id"]))
            elif frame.get("id") == str(newest):
                return ids  # the position after the replay
    raise AssertionError("the stream ended before the replay did")


GLOBS = ["[!r]*", "turn.[cs]*", "raw.agent.[x]", "*.?tarted", "session.*", "raw.*[*", "*"]


async def test_type_globs_select_the_same_changes_in_the_log_and_in_streams(relay: Relay) -> None:
    """A type glob selects the same changes from /v1/changes as from a stream."""
    for event in fixture_events():
        await ingest(relay, event)
    await ingest(relay, {"id": "evt_brackets", "type": "agent.[x]", "data": {"chatId": "c1"}})
    everything = await get(relay, "/v1/changes", type="*", limit=1000)
    newest = everything["items"][-1]["id"]
    selected = {}
    for pattern in GLOBS:
        page = await get(relay, "/v1/changes", type=pattern, limit=1000)
        selected[pattern] = {change["id"] for change in page["items"]}
        assert await stream_ids(relay, pattern, newest) == selected[pattern], pattern
    assert selected["[!r]*"] == set()  # brackets are literal characters
    assert selected["turn.[cs]*"] == set()
    assert len(selected["raw.agent.[x]"]) == 1
    assert len(selected["*.?tarted"]) == 4  # turn.started and its raw event, twice


async def sse_until_ready(
    relay: Relay, headers: dict[str, str], event: dict[str, Any]
) -> list[ServerSentEvent]:
    """What httpx-sse hands over on /v1/stream until a session.ready that `event`,
    ingested once the stream is live, makes."""
    url = str(relay.client.make_url("/v1/stream"))
    received: list[ServerSentEvent] = []
    async with (
        httpx.AsyncClient(headers={**relay.auth, **headers}, timeout=10) as http,
        aconnect_sse(http, "GET", url) as source,
        asyncio.timeout(30),
    ):
        async for sse in source.aiter_sse():
            received.append(sse)
            if sse.event == "stream.position":
                await ingest(relay, event)
            live = any(seen.event == "stream.position" for seen in received)
            if sse.event == "session.ready" and live:
                return received
    raise AssertionError("the stream ended")


async def test_every_event_a_client_library_hands_over_has_json_data(relay: Relay) -> None:
    """httpx-sse gets only changes and named stream.* events, each with JSON data."""
    events = fixture_events()
    await ingest(relay, events[0])
    for resume in ({}, {"Last-Event-ID": "0"}):
        ready = {**events[3], "id": f"evt_ready_{len(resume)}", "data": {"chatId": str(resume)}}
        received = await sse_until_ready(relay, resume, ready)
        for sse in received:
            assert sse.event.startswith("stream.") or sse.event in LIFECYCLE_CHANGES
            assert isinstance(orjson.loads(sse.data), dict)
        position = [sse for sse in received if sse.event == "stream.position"]
        assert len(position) == 1
        assert orjson.loads(position[0].data) == {"id": int(position[0].id)}
        assert received[0].retry == 3000


async def test_a_resume_id_ahead_of_the_log_resets_and_goes_on_live(relay: Relay) -> None:
    """Last-Event-ID beyond the newest change gets stream.reset, then live changes."""
    events = fixture_events()
    await ingest(relay, events[0])
    newest = (await get(relay, "/v1/changes", type="*"))["items"][-1]["id"]
    received = await sse_until_ready(relay, {"Last-Event-ID": str(newest + 1000)}, events[3])
    assert [sse.event for sse in received] == ["stream.reset", "stream.position", "session.ready"]
    assert orjson.loads(received[0].data) == {"newest_id": newest}
    assert received[1].id == str(newest)
    assert newest < int(received[-1].id) < newest + 1000


async def test_heartbeats_are_no_events_for_a_client_library(start_relay: RelayFactory) -> None:
    """httpx-sse's decoder finds no event without data in a stream with heartbeats."""
    relay = await start_relay(sse={"heartbeat_seconds": 0.05})
    await ingest(relay, fixture_events()[0])
    stream = b""
    headers = {**relay.auth, "Last-Event-ID": "0"}
    async with (
        relay.client.get("/v1/stream", headers=headers) as resp,
        asyncio.timeout(10),
    ):
        while stream.count(b": heartbeat") < 3:
            stream += await resp.content.readany()
    decoder = SSEDecoder()
    lines = re.split(r"\r\n|\r|\n", stream.decode())[:-1]  # the last one is not complete
    events = [decoder.decode(line) for line in lines]
    handed_over = [event for event in events if event is not None]
    assert [event.event for event in handed_over] == ["session.created", "stream.position"]
    assert all(orjson.loads(event.data) for event in handed_over)


async def test_access_token_is_refused_outside_event_streams(relay: Relay) -> None:
    """?access_token= is 401 on write routes and JSON reads, and opens an event stream."""
    token = {"access_token": relay.key}
    new = {"url": "https://example.com/hook"}
    for resp in (
        await relay.client.post("/v1/subscriptions", params=token, json=new),
        await relay.client.get("/v1/subscriptions", params=token),
        await relay.client.get("/v1/events", params=token),
        await relay.client.get("/v1/changes", params=token),
    ):
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["code"] == "UNAUTHORIZED"
        assert "only on event streams" in error["message"]
    assert (
        await relay.client.post("/v1/subscriptions", json=new, headers=relay.auth)
    ).status == 201
    await ingest(relay, fixture_events()[0])
    async with relay.client.get("/v1/stream", params={**token, "last_event_id": "0"}) as resp:
        assert resp.status == 200
        got = await asyncio.wait_for(read_changes(resp, 1), timeout=10)
    assert got[0]["event"] == "session.created"


async def test_revoking_a_key_ends_its_open_streams(start_relay: RelayFactory) -> None:
    """A stream opened with a key that is then revoked ends within seconds; others go on."""
    relay = await start_relay(sse={"key_check_seconds": 0.2})
    store = relay.client.app[STORE]
    reader = await create_key(store, "reader", (READ,))
    url = str(relay.client.make_url("/v1/stream"))
    revoked = {"Authorization": f"Bearer {reader.secret}"}
    async with (
        httpx.AsyncClient(timeout=10) as http,
        aconnect_sse(http, "GET", url, headers=revoked) as doomed,
        aconnect_sse(http, "GET", url, headers=relay.auth) as kept,
    ):
        doomed_events, kept_events = doomed.aiter_sse(), kept.aiter_sse()
        assert (await anext(doomed_events)).event == "stream.position"
        assert (await anext(kept_events)).event == "stream.position"
        assert await store.revoke_api_key(reader.key.id, "2026-12-01T00:00:00.000Z")
        async with asyncio.timeout(15):  # checked every 0.2 s; open for good otherwise
            assert [sse async for sse in doomed_events] == []  # the stream ended
        await ingest(relay, fixture_events()[0])
        async with asyncio.timeout(15):
            assert (await anext(kept_events)).event == "session.created"
    again = await relay.client.get("/v1/stream", headers=revoked)
    assert again.status == 401


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[int]:
    """A relay run as `relay serve` runs it, with a 1 s idle timeout; yields its port."""
    settings = make_settings(tmp_path, server={"idle_timeout_seconds": 1.0})
    runner = app_runner(create_app(settings), settings.server)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, within `seconds`."""
    async with asyncio.timeout(seconds):
        return await reader.read()


async def test_a_client_trickling_headers_is_disconnected(served: int) -> None:
    """A connection sending its headers a byte at a time is closed, unanswered, in time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")

    async def trickle() -> None:
        for byte in b"X-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.25)

    trickling = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, 15) == b""
    finally:
        trickling.cancel()
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed(served: int) -> None:
    """A keep-alive connection with no next request is closed after the idle timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    answer = await closed_within(reader, 15)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"status":"ok"}')


@pytest.mark.parametrize("request_id", ["a\x01b", "a\x7fb", "x" * 129, "caf\u00e9"])
async def test_a_request_id_that_is_not_plain_text_is_not_echoed(
    served: int, request_id: str
) -> None:
    """An X-Request-Id with controls or other than printable ASCII is replaced, not echoed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nX-Request-Id: "
        + request_id.encode()
        + b"\r\n\r\n"
    )
    answer = await closed_within(reader, 15)
    writer.close()
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.")  # answered (aiohttp itself refuses some with 400)
    assert request_id.encode() not in head
