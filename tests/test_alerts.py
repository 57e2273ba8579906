"""Alerts: `turn.stalled` and `session.ready_timeout`, from deadlines kept in the store."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.app import create_app, source_providers
from relay.appkeys import STORE
from relay.config import AlertSettings
from relay.store import open_store
from tests.conftest import Relay, RelayFactory, make_settings
from tests.receivers import until
from tests.test_read_api import get, ingest


def now_event(n: str, kind: str, session: str, turn: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"chatId": session}
    if turn:
        data["turnId"] = turn
    return {
        "id": f"evt_{n}",
        "type": kind,
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }


async def changes(relay: Relay, kind: str) -> list[dict[str, Any]]:
    return [c for c in (await get(relay, "/v1/changes"))["items"] if c["type"] == kind]


async def poll_changes(relay: Relay, kind: str, seconds: float = 5) -> list[dict[str, Any]]:
    """Changes of `kind`, polled every 50 ms until there are some or `seconds` pass."""
    for _ in range(int(seconds / 0.05)):
        found = await changes(relay, kind)
        if found:
            return found
        await asyncio.sleep(0.05)
    return []


async def test_alerts_fire_once_by_the_clock_given(start_relay: RelayFactory) -> None:
    """With a fake clock: a stalled turn and an unready session alert once each."""
    relay = await start_relay(
        alerts={
            "turn_stall_seconds": 600,
            "ready_timeout_seconds": 120,
            "check_interval_seconds": 3600,
        }
    )
    store = relay.client.app[STORE]
    await ingest(relay, now_event("1", "agent.chat.session.created", "chat_a"))
    await ingest(relay, now_event("2", "agent.chat.turn.started", "chat_a", "turn_1"))
    start = time.time()
    assert await store.fire_due_alerts(start + 60) == 0
    assert await store.fire_due_alerts(start + 130) == 1
    assert [c["session_id"] for c in await changes(relay, "session.ready_timeout")] == ["chat_a"]
    assert await store.fire_due_alerts(start + 610) == 1
    stalled = await changes(relay, "turn.stalled")
    assert [(c["session_id"], c["turn_id"]) for c in stalled] == [("chat_a", "turn_1")]
    assert stalled[0]["turn"]["status"] == "running"
    assert stalled[0]["cause"] is None
    assert await store.fire_due_alerts(start + 5000) == 0


async def test_later_events_clear_pending_alerts(start_relay: RelayFactory) -> None:
    """A worker-ready and a completed turn clear their alerts before they are due."""
    relay = await start_relay(alerts={"check_interval_seconds": 3600})
    store = relay.client.app[STORE]
    await ingest(relay, now_event("1", "agent.chat.session.created", "chat_b"))
    await ingest(relay, now_event("2", "agent.chat.turn.started", "chat_b", "turn_1"))
    await ingest(relay, now_event("3", "agent.worker.ready", "chat_b"))
    await ingest(relay, now_event("4", "agent.chat.turn.completed", "chat_b", "turn_1"))
    assert await store.fire_due_alerts(time.time() + 100_000) == 0
    assert await changes(relay, "turn.stalled") == []


async def test_alerts_fire_in_real_time_and_after_a_restart(tmp_path: Path) -> None:
    """End to end with short thresholds: alerts fire on time, and also after a restart."""
    from aiohttp.test_utils import TestClient, TestServer

    ready_timeout = 5.0
    alerts = {
        "turn_stall_seconds": 0.6,
        "ready_timeout_seconds": ready_timeout,
        "check_interval_seconds": 0.1,
    }
    settings = make_settings(tmp_path, alerts=alerts, auth={"enabled": False})

    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    relay = Relay(client, "")
    try:
        # Ready means the writer process (started on first use) commits: its start,
        # seconds on a loaded machine, would otherwise come between the two events' times.
        await until(relay.ready)
        created = time.monotonic()
        await ingest(relay, now_event("1", "agent.chat.session.created", "chat_c"))
        await ingest(relay, now_event("2", "agent.chat.turn.started", "chat_c", "turn_1"))
        assert len(await poll_changes(relay, "turn.stalled", seconds=ready_timeout)) == 1
        timed_out = await changes(relay, "session.ready_timeout")
        # A machine too busy to see the stall before the session's deadline has already
        # fired that too; the restart below must still not fire either alert again.
        if time.monotonic() - created < ready_timeout - 0.5:
            assert timed_out == []
    finally:
        await client.close()  # the relay stops, normally before the session's deadline

    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    relay = Relay(client, "")
    try:
        assert len(await poll_changes(relay, "session.ready_timeout", seconds=15)) == 1
        # The stall's deadline is the earlier one: fired again, it would be logged by now.
        assert len(await changes(relay, "turn.stalled")) == 1
    finally:
        await client.close()


async def test_deadlines_survive_in_the_store_file(tmp_path: Path) -> None:
    """A fresh store on the same file fires the alerts the old one scheduled."""
    settings = make_settings(tmp_path)
    store = open_store(
        settings.store, source_providers(settings), AlertSettings(ready_timeout_seconds=5)
    )
    await store.open()
    from relay.events import Event
    from relay.store import IngestRecord

    now = datetime.now(UTC)
    created = Event("casedev", "evt_x", "agent.chat.session.created", now, "chat_d")
    body = orjson.dumps({"id": "evt_x", "type": created.type, "data": {"chatId": "chat_d"}})
    await store.ingest(IngestRecord(created, body, now))
    await store.close()

    again = open_store(
        settings.store, source_providers(settings), AlertSettings(ready_timeout_seconds=5)
    )
    await again.open()
    try:
        assert await again.fire_due_alerts(now.timestamp() + 4) == 0
        assert await again.fire_due_alerts(now.timestamp() + 6) == 1
        fired = await again.list_changes(0, 10, ("session.ready_timeout",))
        assert [c.session_id for c in fired] == ["chat_d"]
    finally:
        await again.close()


async def test_an_event_received_before_the_deadline_but_not_yet_written_ends_the_alert(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn's completion received before its stall deadline, but still waiting to be
    written when the deadline passes (a store slow to take that batch), ends the turn:
    no `turn.stalled` fires for it, before or after."""
    from relay.store.base import GroupCommit

    start = time.time()
    now = [start]  # the relay's clock: it moves only when this test moves it
    checks = [0]  # alert checks finished
    real_write_batch = GroupCommit._write_batch

    async def slow_for_completions(self: GroupCommit, batch: Any, *rest: Any) -> None:
        records = [record for group, _ in batch for record in group]
        if any(record.event.type == "agent.chat.turn.completed" for record in records):
            now[0] = start + 5  # the deadline passes while this batch waits...
            seen = checks[0]
            for _ in range(3000):  # ...through two alert checks, at most 30 s
                if checks[0] >= seen + 2:
                    break
                await asyncio.sleep(0.01)
        await real_write_batch(self, batch, *rest)

    monkeypatch.setattr(GroupCommit, "_write_batch", slow_for_completions)
    relay = await start_relay(
        clock=lambda: now[0],
        alerts={"turn_stall_seconds": 1.0, "check_interval_seconds": 0.05},
    )
    store = relay.client.app[STORE]
    real_fire = store.fire_due_alerts

    async def counted_fire(at: float) -> int:
        fired = await real_fire(at)
        checks[0] += 1
        return fired

    monkeypatch.setattr(store, "fire_due_alerts", counted_fire)

    def at(event: dict[str, Any], seconds: float) -> dict[str, Any]:
        occurred = datetime.fromtimestamp(start + seconds, UTC)
        return {**event, "occurred_at": occurred.isoformat().replace("+00:00", "Z")}

    await ingest(relay, at(now_event("1", "agent.chat.session.created", "chat_q"), 0))
    await ingest(relay, at(now_event("2", "agent.chat.turn.started", "chat_q", "turn_1"), 0))
    # A witness: a turn started just after, never completed, whose stall is due just after.
    await ingest(relay, at(now_event("4", "agent.chat.session.created", "chat_r"), 0.1))
    await ingest(relay, at(now_event("5", "agent.chat.turn.started", "chat_r", "turn_1"), 0.1))
    now[0] = start + 0.6  # the completion is received before the deadline
    completed = now_event("3", "agent.chat.turn.completed", "chat_q", "turn_1")
    await ingest(relay, at(completed, 0.6))
    stalled = await poll_changes(relay, "turn.stalled", seconds=10)  # past chat_q's deadline
    assert [c["session_id"] for c in stalled] == ["chat_r"]
    logged = (await get(relay, "/v1/changes", type="turn.*"))["items"]
    mine = [c["type"] for c in logged if c["session_id"] == "chat_q"]
    assert mine == ["turn.started", "turn.completed"]
