"""Store hardening: poison input, writer recovery, single instance, retention, URLs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Relay, RelayFactory, fixture_events
from tests.test_ingest import post, signed


def nested_event(depth: int, newline: bool) -> bytes:
    """A valid fixture event whose `data` holds lists nested `depth` levels deep."""
    event: dict[str, Any] = dict(fixture_events()[0])
    event["id"] = f"evt_deep_{depth}_{newline}"
    event["data"] = {**event.get("data", {}), "deep": "DEEP"}
    body = orjson.dumps(event, option=orjson.OPT_INDENT_2 if newline else None)
    deep = b"[" * (depth - 2) + b"\n" + b"]" * (depth - 2)  # inside the object and `data`
    return body.replace(b'"DEEP"', deep)


async def test_deeply_nested_event_is_a_400_not_a_retryable_503(relay: Relay) -> None:
    """An event nested 300 levels deep with line breaks is refused with 400 on every try."""
    body = nested_event(300, newline=True)
    for _ in range(2):
        status, answer = await post(relay, body, signed(body))
        assert status == 400, answer
        assert answer["error"]["code"] == "INVALID_JSON"
        assert "nested deeper than" in answer["error"]["message"]
    assert await relay.events() == []


async def test_moderately_nested_event_is_stored(relay: Relay) -> None:
    """An event nested 200 levels deep with line breaks is stored."""
    body = nested_event(200, newline=True)
    status, answer = await post(relay, body, signed(body))
    assert status == 202, answer


async def test_unavailable_store_answers_without_internal_detail(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """A 503 from ingest and /readyz says to retry and names no internal error."""
    relay = await start_relay(
        store={"url": f"sqlite:///{tmp_path}/relay.db", "busy_timeout_ms": 50}
    )
    blocker = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        body = orjson.dumps(fixture_events()[0])
        status, answer = await post(relay, body, signed(body))
        ready = await relay.client.get("/readyz")
        readiness = await ready.json()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (status, ready.status) == (503, 503)
    for error in (answer["error"], readiness["error"]):
        assert error["code"] == "STORE_UNAVAILABLE"
        assert "retry" in error["message"]
        assert "locked" not in error["message"]
