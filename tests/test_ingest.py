"""`POST /v1/ingest/{source}` over real HTTP on loopback, with a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import standardwebhooks
import svix

from relay.sign import sign_standard
from tests.conftest import SECRET, Relay, RelayFactory, fixture_events


def signed(
    body: bytes, secret: str = SECRET, prefix: str = "webhook-", **extra: str
) -> dict[str, str]:
    ts = int(time.time())
    msg_id = "msg_" + str(time.monotonic_ns())
    return {
        f"{prefix}id": msg_id,
        f"{prefix}timestamp": str(ts),
        f"{prefix}signature": sign_standard(secret, msg_id, ts, body),
        **extra,
    }


async def post(relay: Relay, body: bytes, headers: dict[str, str], source: str = "casedev") -> Any:
    resp = await relay.client.post(f"/v1/ingest/{source}", data=body, headers=headers)
    return resp.status, await resp.json()


async def test_fixture_events_are_stored_with_increasing_seq(relay: Relay) -> None:
    """Each fixture event is answered 202 with a new seq and appears in /v1/events."""
    seqs = []
    for event in fixture_events():
        body = orjson.dumps(event)
        status, answer = await post(relay, body, signed(body))
        assert status == 202
        assert answer["id"] == event["id"]
        assert answer["duplicate"] is False
        seqs.append(answer["seq"])
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    stored = await relay.events()
    assert [e["id"] for e in stored] == [e["id"] for e in fixture_events()]
    assert stored[0]["session_id"] == "chat_01JD7Q8M2X"
    assert stored[5]["turn_id"] == "turn_001"
    assert stored[0]["payload"] == fixture_events()[0]


async def test_third_party_signers_are_accepted_over_http(relay: Relay) -> None:
    """Requests signed by the standardwebhooks and svix libraries are stored."""
    events = fixture_events()
    now = datetime.now(UTC)
    body = orjson.dumps(events[0])
    std = standardwebhooks.Webhook(SECRET).sign("msg_a", now, body.decode())
    headers = {"webhook-id": "msg_a", "webhook-timestamp": str(int(now.timestamp()))}
    status, _ = await post(relay, body, {**headers, "webhook-signature": std})
    assert status == 202
    body = orjson.dumps(events[1])
    sv = svix.Webhook(SECRET).sign("msg_b", now, body.decode())
    headers = {"svix-id": "msg_b", "svix-timestamp": str(int(now.timestamp()))}
    status, _ = await post(relay, body, {**headers, "svix-signature": sv}, source="svix")
    assert status == 202
    assert [e["source"] for e in await relay.events()] == ["casedev", "svix"]


def _bad_requests() -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    event = orjson.dumps(fixture_events()[0])
    stale = signed(event)
    old = int(time.time()) - 3600
    stale["webhook-timestamp"] = str(old)
    stale["webhook-signature"] = sign_standard(SECRET, stale["webhook-id"], old, event)
    forged = signed(event)
    forged["webhook-signature"] = forged["webhook-signature"][:-6] + "AAAAA="
    no_id = orjson.dumps({"type": "agent.worker.ready", "data": {}})
    no_type = orjson.dumps({"id": "evt_x", "data": {}})
    bad_time = orjson.dumps({"id": "evt_y", "type": "t", "occurred_at": "yesterday"})
    return [
        ("no signature", "casedev", event, {}, 401, "MISSING_SIGNATURE"),
        ("forged signature", "casedev", event, forged, 401, "INVALID_SIGNATURE"),
        ("other body", "casedev", event + b" ", signed(event), 401, "INVALID_SIGNATURE"),
        ("stale timestamp", "casedev", event, stale, 401, "TIMESTAMP_OUT_OF_TOLERANCE"),
        ("not JSON", "casedev", b"{nope", signed(b"{nope"), 400, "INVALID_JSON"),
        ("JSON array", "casedev", b"[1, 2]", signed(b"[1, 2]"), 400, "INVALID_JSON"),
        ("no event id", "casedev", no_id, signed(no_id), 400, "INVALID_EVENT"),
        ("no event type", "casedev", no_type, signed(no_type), 400, "INVALID_EVENT"),
        ("bad occurred_at", "casedev", bad_time, signed(bad_time), 400, "INVALID_EVENT"),
        ("unknown source", "nope", event, signed(event), 404, "UNKNOWN_SOURCE"),
    ]


# Signed when the test runs, not when the suite is collected: a slow suite would
# otherwise send timestamps past the tolerance, which is checked first.
_BAD_CASES = [case[0] for case in _bad_requests()]


@pytest.mark.parametrize("case", _BAD_CASES)
async def test_rejections_store_nothing_and_leave_the_relay_ready(relay: Relay, case: str) -> None:
    """Each bad request gets its status and error code, stores nothing; /readyz stays 200."""
    _, source, body, headers, status, code = {c[0]: c for c in _bad_requests()}[case]
    got_status, answer = await post(relay, body, headers, source=source)
    assert (got_status, answer["error"]["code"]) == (status, code)
    assert answer["error"]["message"]
    assert await relay.events() == []
    assert (await relay.client.get("/readyz")).status == 200


async def test_invalid_event_names_the_field(relay: Relay) -> None:
    """INVALID_EVENT says which field is missing."""
    body = orjson.dumps({"id": "evt_1", "data": {}})
    _, answer = await post(relay, body, signed(body))
    assert answer["error"]["message"].startswith("type:")


async def test_body_over_the_limit_is_413(start_relay: RelayFactory) -> None:
    """A body over server.max_body_bytes is 413 PAYLOAD_TOO_LARGE, chunked or not."""
    relay = await start_relay(server={"max_body_bytes": 1000})
    event = {**fixture_events()[0], "data": {"chatId": "c", "pad": "x" * 2000}}
    body = orjson.dumps(event)
    status, answer = await post(relay, body, signed(body))
    assert (status, answer["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")

    async def chunks() -> Any:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    resp = await relay.client.post("/v1/ingest/casedev", data=chunks(), headers=signed(body))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert await relay.events() == []
    assert (await relay.client.get("/readyz")).status == 200


async def test_duplicate_is_answered_200_with_the_original_seq(relay: Relay) -> None:
    """A second delivery of the same event id is 200 duplicate with the first seq."""
    body = orjson.dumps(fixture_events()[0])
    first = await post(relay, body, signed(body))
    again = await post(relay, body, signed(body))
    assert (first[0], again[0]) == (202, 200)
    assert again[1] == {**first[1], "duplicate": True}
    assert len(await relay.events()) == 1


async def test_same_event_50_times_concurrently_is_stored_once(relay: Relay) -> None:
    """50 concurrent copies of one event: one stored, all 2xx with one seq, one not duplicate."""
    body = orjson.dumps(fixture_events()[3])
    answers = await asyncio.gather(*(post(relay, body, signed(body)) for _ in range(50)))
    assert all(status in (200, 202) for status, _ in answers)
    assert len({answer["seq"] for _, answer in answers}) == 1
    assert sum(answer["duplicate"] is False for _, answer in answers) == 1
    assert sum(status == 202 for status, _ in answers) == 1
    assert len(await relay.events()) == 1


async def test_same_event_id_from_two_sources_is_two_events(relay: Relay) -> None:
    """Deduplication is per (source, event id)."""
    body = orjson.dumps(fixture_events()[0])
    assert (await post(relay, body, signed(body)))[0] == 202
    assert (await post(relay, body, signed(body, prefix="svix-"), source="svix"))[0] == 202
    assert len(await relay.events()) == 2


@pytest.mark.parametrize(
    ("source", "headers_for"),
    [
        ("github", "github"),
        ("vault", "vault"),
        ("motus", "motus"),
        ("open", "open"),
    ],
)
async def test_other_schemes_store_events(relay: Relay, source: str, headers_for: str) -> None:
    """hmac-sha256 (plain and timestamped), bearer and none sources accept good requests."""
    from relay.config import SourceSettings
    from relay.send import signed_headers
    from tests.conftest import source_table

    settings = next(SourceSettings(**s) for s in source_table() if s["id"] == headers_for)
    body = orjson.dumps({**fixture_events()[0], "id": f"evt_{source}"})
    status, answer = await post(relay, body, signed_headers(settings, body), source=source)
    assert status == 202, answer
    wrong = {k: v + "0" for k, v in signed_headers(settings, body).items() if k != "Content-Type"}
    if source != "open":
        status, answer = await post(relay, body, wrong, source=source)
        assert status == 401
    assert len(await relay.events()) == 1


async def test_store_that_cannot_write_answers_503(
    start_relay: RelayFactory, tmp_path: Any
) -> None:
    """While another writer holds the database lock, ingest is 503 STORE_UNAVAILABLE."""
    relay = await start_relay(
        store={"url": f"sqlite:///{tmp_path}/relay.db", "busy_timeout_ms": 50}
    )
    blocker = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        body = orjson.dumps(fixture_events()[0])
        resp = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await resp.json())["error"]["code"] == "STORE_UNAVAILABLE"
        assert (await relay.client.get("/readyz")).status == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await relay.client.get("/readyz")).status == 200
    assert (await post(relay, body, signed(body)))[0] == 202
    assert len(await relay.events()) == 1
