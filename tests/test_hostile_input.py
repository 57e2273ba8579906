"""Hostile or extreme input gets a clear 4xx, stores nothing, and leaves the relay well."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest

from relay.appkeys import STORE
from tests.conftest import Relay, fixture_events
from tests.test_ingest import post, signed
from tests.test_read_api import get, ingest


def event(**changes: Any) -> bytes:
    base = {**fixture_events()[4]}
    data = {**base["data"], **changes.pop("data", {})}
    return orjson.dumps({**base, **changes, "data": data})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (event(occurred_at="9999-12-31T23:59:30Z"), "occurred_at"),
        (event(occurred_at="0001-01-01T00:00:00+01:00"), "occurred_at"),
        (event(occurred_at="1900-01-01T00:00:00Z"), "occurred_at"),
        (event(data={"usage": {"inputTokens": 2**64 - 1, "outputTokens": 1}}), "usage.inputTokens"),
        (event(data={"retryAfter": 1e300}), "retryAfter"),
    ],
)
async def test_extreme_values_are_invalid_events(relay: Relay, body: bytes, field: str) -> None:
    """Out-of-range times and numbers are 400 INVALID_EVENT naming the field; nothing is stored."""
    status, answer = await post(relay, body, signed(body))
    assert (status, answer["error"]["code"]) == (400, "INVALID_EVENT")
    assert answer["error"]["message"].startswith(field)
    assert await relay.events() == []
    good = orjson.dumps(fixture_events()[0])
    assert (await post(relay, good, signed(good)))[0] == 202


async def raw_request(relay: Relay, request: bytes) -> int:
    """Send bytes the HTTP client would refuse to, and return the status code."""
    server = relay.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    return int(status_line.split()[1])


async def test_non_utf8_credentials_are_401_not_500(relay: Relay) -> None:
    """A bearer token or API key with bytes that are not UTF-8 is refused with 401."""
    ingest_request = (
        b"POST /v1/ingest/motus HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert await raw_request(relay, ingest_request) == 401
    read_request = b"GET /v1/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer \xff\r\n\r\n"
    assert await raw_request(relay, read_request) == 401
    assert (await relay.client.get("/readyz")).status == 200


async def test_absurd_signature_timestamp_is_401(relay: Relay) -> None:
    """A timestamp header of thousands of digits is INVALID_SIGNATURE, not a crash."""
    body = orjson.dumps(fixture_events()[0])
    headers = signed(body)
    headers["webhook-timestamp"] = "9" * 4000
    status, answer = await post(relay, body, headers)
    assert status == 401
    assert answer["error"]["code"] in ("INVALID_SIGNATURE", "TIMESTAMP_OUT_OF_TOLERANCE")


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/v1/sessions", [1e30, 1, "a"]),
        ("/v1/sessions", [2**63 + 5, 1, "a"]),
        ("/v1/sessions/chat_01JD7Q8M2X/turns", [2**63 + 5]),
    ],
)
async def test_oversized_cursor_values_are_400(relay: Relay, path: str, cursor: list[Any]) -> None:
    """Cursor values past the id range are 400 INVALID_PARAMETER."""
    await ingest(relay, fixture_events()[0])
    raw = base64.urlsafe_b64encode(orjson.dumps(cursor)).decode().rstrip("=")
    resp = await relay.client.get(path, params={"cursor": raw}, headers=relay.auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_events_that_change_no_state_still_order_sessions(relay: Relay) -> None:
    """An unknown-type event counts as activity, so paging neither skips nor repeats."""
    ready = fixture_events()[3]
    await ingest(relay, {**ready, "id": "evt_s", "data": {"chatId": "S"}})
    await ingest(relay, {**ready, "id": "evt_t", "data": {"chatId": "T"}})
    await ingest(relay, {**ready, "id": "evt_s2", "type": "agent.custom", "data": {"chatId": "S"}})
    page = await get(relay, "/v1/sessions", limit=1)
    assert [s["session_id"] for s in page["items"]] == ["S"]
    await ingest(relay, {**ready, "id": "evt_s3", "type": "agent.custom", "data": {"chatId": "S"}})
    rest = await get(relay, "/v1/sessions", limit=1, cursor=page["next_cursor"])
    assert [s["session_id"] for s in rest["items"]] == ["T"]


async def test_sub_millisecond_and_missing_times_rebuild_identically(relay: Relay) -> None:
    """Times finer than a millisecond, or none at all, give the same state after a rebuild."""
    runtime = {**fixture_events()[1], "id": "evt_r", "occurred_at": "2026-11-20T09:00:00.000500Z"}
    ready = {**fixture_events()[3], "id": "evt_w", "occurred_at": "2026-11-20T09:00:00.000700Z"}
    unstamped = {k: v for k, v in fixture_events()[4].items() if k != "occurred_at"}
    for item in (runtime, ready, unstamped):
        await ingest(relay, item)
    assert await relay.client.app[STORE].check_derived_state() == []
    session = await get(relay, "/v1/sessions/chat_01JD7Q8M2X")
    assert session["readiness"] == "ready"
