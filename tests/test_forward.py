"""Forwarded streams and per-turn callbacks: `POST /v1/ingest/{source}` with frames."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.app import STORE
from relay.changes import Commit
from relay.config import SourceSettings, StoreSettings
from relay.ingest import Source
from relay.pipeline import Request, to_events
from relay.providers.canonical import encode
from relay.providers.frames import parse_frames
from relay.send import signed_headers
from relay.store import IngestRecord, open_store
from tests.conftest import BEARER_TOKEN, SECRET, Relay, RelayFactory
from tests.provider_fixtures import (
    PROVIDERS,
    ROOT,
    expected,
    observed_dict,
    requests,
    source_settings,
)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
SCRIBERR_RUN = (ROOT / "scriberr" / "run_1.sse").read_bytes()


class Clock:
    """The relay's clock, set by the test to each request's receipt time."""

    def __init__(self) -> None:
        self.now = 1_764_590_400.0

    def __call__(self) -> float:
        return self.now


def signed_source(provider: str, source_id: str | None = None) -> dict[str, Any]:
    table = source_settings(provider).model_dump(mode="json", exclude_none=True)
    if provider == "motus":
        return {
            **table,
            "id": source_id or table["id"],
            "verify": "bearer",
            "secrets": [BEARER_TOKEN],
        }
    return {
        **table,
        "id": source_id or table["id"],
        "verify": "standard-webhooks",
        "secrets": [SECRET],
    }


async def start(start_relay: RelayFactory, *tables: dict[str, Any]) -> tuple[Relay, Clock]:
    clock = Clock()
    return await start_relay(clock=clock, sources=list(tables)), clock


async def forward(
    relay: Relay,
    table: dict[str, Any],
    body: bytes,
    *,
    content_type: str = SSE,
    stream_id: str | None = "req_1",
    now: float | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    settings = SourceSettings(**table)
    stamp = int(now if now is not None else 1_764_590_400)
    signed = signed_headers(settings, body, stamp, stream_id, content_type)
    resp = await relay.client.post(
        f"/v1/ingest/{settings.id}", data=body, headers={**signed, **(headers or {})}, params=params
    )
    return resp.status, await resp.json()


def as_ndjson(sse: bytes) -> bytes:
    """The same frames as NDJSON lines of their SSE fields."""
    lines = []
    for frame in parse_frames(SSE, sse):
        line: dict[str, Any] = {"data": frame.data}
        if frame.name:
            line["event"] = frame.name
        if frame.id:
            line["id"] = frame.id
        lines.append(orjson.dumps(line))
    return b"\n".join(lines) + b"\n"


def summary(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((e["id"], e["type"], e["session_id"], e["turn_id"]) for e in events)


async def test_sse_and_ndjson_give_the_same_events(start_relay: RelayFactory) -> None:
    """A stream forwarded as SSE and as NDJSON is stored as the same events."""
    as_sse, as_nd = signed_source("scriberr", "scr_sse"), signed_source("scriberr", "scr_nd")
    relay, _ = await start(start_relay, as_sse, as_nd)
    assert await forward(relay, as_sse, SCRIBERR_RUN) == (
        202,
        {"events": 4, "stored": 4, "duplicates": 0},
    )
    status, answer = await forward(relay, as_nd, as_ndjson(SCRIBERR_RUN), content_type=NDJSON)
    assert (status, answer["stored"]) == (202, 4)
    events = await relay.events()
    by_source = {s: summary([e for e in events if e["source"] == s]) for s in ("scr_sse", "scr_nd")}
    assert by_source["scr_sse"] == by_source["scr_nd"]
    assert ("req_1:0", "agent.chat.turn.started", "chat_8f2c", "chatrun_01") in by_source["scr_sse"]


async def test_forwarded_twice_is_all_duplicates(start_relay: RelayFactory) -> None:
    """The same stream forwarded again stores nothing new."""
    table = signed_source("scriberr")
    relay, _ = await start(start_relay, table)
    first = await forward(relay, table, SCRIBERR_RUN)
    again = await forward(relay, table, SCRIBERR_RUN)
    assert first == (202, {"events": 4, "stored": 4, "duplicates": 0})
    assert again == (202, {"events": 4, "stored": 0, "duplicates": 4})
    assert len(await relay.events()) == 4


async def test_one_malformed_frame_rejects_the_stream(start_relay: RelayFactory) -> None:
    """A frame that is not JSON gets 400 INVALID_EVENT naming it, and nothing is stored."""
    table = signed_source("scriberr")
    relay, _ = await start(start_relay, table)
    broken = SCRIBERR_RUN.replace(b'"delta": "covers pricing."}', b'"delta": "covers pri', 1)
    status, answer = await forward(relay, table, broken)
    assert status == 400
    assert answer["error"]["code"] == "INVALID_EVENT"
    assert "frame 4" in answer["error"]["message"]
    no_type = b'data: {"session_id": "chat_8f2c"}\n\n'
    status, answer = await forward(relay, table, SCRIBERR_RUN + no_type, stream_id="req_2")
    assert (status, answer["error"]["code"]) == (400, "INVALID_EVENT")
    assert "frame 6" in answer["error"]["message"]
    assert await relay.events() == []


@pytest.mark.parametrize("signature", ["missing", "wrong"])
async def test_unsigned_forward_is_refused(start_relay: RelayFactory, signature: str) -> None:
    """An unsigned or wrongly signed forward gets 401 and stores nothing."""
    table = signed_source("casey")
    relay, _ = await start(start_relay, table)
    body = (ROOT / "casey" / "chat_1.sse").read_bytes()
    if signature == "missing":
        resp = await relay.client.post(
            "/v1/ingest/casey", data=body, headers={"Content-Type": SSE, "webhook-id": "req_1"}
        )
        status = resp.status
        code = (await resp.json())["error"]["code"]
    else:
        other = {**table, "secrets": ["whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="]}
        status, answer = await forward(relay, other, body)
        code = answer["error"]["code"]
    assert status == 401
    assert code in ("MISSING_SIGNATURE", "INVALID_SIGNATURE")
    assert await relay.events() == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_fixture_over_http_gives_expected_state(
    start_relay: RelayFactory, provider: str
) -> None:
    """Each provider's fixture, sent to a running relay, derives its expected state."""
    table = signed_source(provider)
    relay, clock = await start(start_relay, table)
    for index, item in enumerate(requests(provider)):
        clock.now = item.received_at.timestamp()
        params = {"session_id": item.session_id} if item.session_id else None
        status, _ = await forward(
            relay,
            table,
            item.body,
            content_type=item.content_type,
            stream_id=item.stream_id or f"msg_{index}",
            now=clock.now,
            params=params,
        )
        assert status == 202
    want = expected(provider)
    resp = await relay.client.get(f"/v1/sessions/{want['session_id']}", headers=relay.auth)
    session = await resp.json()
    resp = await relay.client.get(
        f"/v1/sessions/{want['session_id']}/turns", params={"limit": 100}, headers=relay.auth
    )
    turns = {t["turn_id"]: t for t in (await resp.json())["items"]}
    assert observed_dict(session, turns, want) == want
    assert await relay.client.app[STORE].check_derived_state() == []


@pytest.mark.parametrize(("name", "turn_id"), [("callback_1", "trace_4f1a"), ("callback_3", None)])
async def test_motus_callbacks_with_the_token_are_turns(
    start_relay: RelayFactory, name: str, turn_id: str | None
) -> None:
    """A callback with the right bearer token is a turn; sent twice (re-encoded, when it
    has no trace id), it is one turn."""
    table = signed_source("motus")
    relay, _ = await start(start_relay, table)
    body = (ROOT / "motus" / f"{name}.json").read_bytes()
    resent = body if turn_id else json.dumps(json.loads(body), indent=2).encode()
    first = await forward(relay, table, body, content_type="application/json", stream_id=None)
    again = await forward(relay, table, resent, content_type="application/json", stream_id=None)
    assert first == (202, {"events": 3, "stored": 3, "duplicates": 0})
    assert again == (202, {"events": 3, "stored": 0, "duplicates": 3})
    session_id = json.loads(body)["session_id"]
    resp = await relay.client.get(f"/v1/sessions/{session_id}", headers=relay.auth)
    session = await resp.json()
    assert session["counts"] == {"turns": 1, "completed": 1, "failed": 0, "conflicts": 0}
    assert session["last_turn"]["turn_id"] == turn_id or session["last_turn"]["turn_id"].startswith(
        "motus_"
    )
    assert session["last_turn"]["duration_ms"] == (12500 if turn_id else 2000)
    assert session["provider"] == "motus"


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_motus_callback_without_the_token_is_refused(
    start_relay: RelayFactory, token: str | None
) -> None:
    """A callback with a wrong or missing bearer token gets 401 and stores nothing."""
    table = signed_source("motus")
    relay, _ = await start(start_relay, table)
    body = (ROOT / "motus" / "callback_1.json").read_bytes()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await relay.client.post("/v1/ingest/motus", data=body, headers=headers)
    assert resp.status == 401
    assert await relay.events() == []


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_stream_is_one_transaction(tmp_path: Path, writer: str) -> None:
    """A stream's events commit together, even when they outnumber a batch."""
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/one.db", writer=writer, batch_max=2)
    store = open_store(settings, {"scriberr": "scriberr"})
    commits: list[Commit] = []
    store.add_commit_listener(commits.append)
    await store.open()
    try:
        source = Source.from_settings(source_settings("scriberr"))
        request = Request({"webhook-id": "req_1"}, SCRIBERR_RUN, SSE)
        events = to_events(source, request, datetime.now(UTC))
        records = [IngestRecord(e, encode(e), datetime.now(UTC)) for e in events]
        singles = [store.ingest(r) for r in records[:1]]
        results, *_ = await asyncio.gather(store.ingest_many(records[1:]), *singles)
        assert [r.duplicate for r in results] == [False] * (len(records) - 1)
    finally:
        await store.close()
    raw = [[c.type for c in commit.changes if c.type.startswith("raw.")] for commit in commits]
    assert sorted(len(r) for r in raw if r) == [1, len(records) - 1]
