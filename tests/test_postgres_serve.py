"""A relay whose store URL names PostgreSQL starts, ingests and serves what it derived."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RelayFactory
from tests.test_cli import relay as relay_cli
from tests.test_store_contract import body


def test_relay_migrate_creates_the_postgresql_schema_once(pg_url: str, tmp_path: Path) -> None:
    """`relay migrate` on a postgresql:// store applies its migrations, then none."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "{pg_url}"\n')
    first = relay_cli(config, "migrate").stdout
    assert "applied migrations: [1, 2" in first
    assert "up to date" in relay_cli(config, "migrate").stdout


async def test_a_relay_on_postgresql_ingests_over_http(
    start_relay: RelayFactory, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`store.url = "postgresql://..."`: migrations run at start-up, an admin key is made,
    events are acknowledged once and the session's state and changes are served."""
    pytest.importorskip("relay.webhooks.postgres_store", reason="no PostgreSQL delivery store")
    monkeypatch.chdir(tmp_path)  # the relay's own files go to ./data beside a server store
    relay = await start_relay(store={"url": pg_url})
    headers = {**relay.auth, "Content-Type": "application/json"}
    sent = [
        body("e1", "agent.chat.session.created", "chat_pg", at=0),
        body("e2", "agent.worker.ready", "chat_pg", at=1),
        body("e3", "agent.chat.turn.started", "chat_pg", "turn_1", at=2),
    ]
    for raw in sent:
        resp = await relay.client.post("/v1/ingest/open", data=raw, headers=headers)
        assert resp.status == 202, await resp.text()
    again = await relay.client.post("/v1/ingest/open", data=sent[0], headers=headers)
    assert again.status == 200
    assert (await again.json())["duplicate"] is True
    resp = await relay.client.get("/v1/sessions/chat_pg", headers=relay.auth)
    assert resp.status == 200
    session = await resp.json()
    assert session["readiness"] == "ready"
    assert session["turn_status"] == "running"
    resp = await relay.client.get("/v1/changes", headers=relay.auth)
    kinds = [c["type"] for c in (await resp.json())["items"]]
    assert kinds == ["session.created", "session.ready", "turn.started"]
    ready = await relay.client.get("/readyz")
    assert ready.status == 200
