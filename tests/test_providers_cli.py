"""Providers on the command line: `relay sources check`, `relay send --demo --provider`,
and a `mapping` source refused at start-up when its table is wrong."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BEARER_TOKEN, SECRET, RelayFactory
from tests.provider_fixtures import ROOT

MAPPING = json.loads((ROOT / "mapping" / "source.json").read_text())["mapping"]


def mapping_toml(tmp_path: Path, **changes: object) -> Path:
    """A configuration with one `mapping` source: the fixture's table, with `changes`."""
    lines = [
        f'[store]\nurl = "sqlite:///{tmp_path}/cli.db"\n',
        '[[sources]]\nid = "responses"\nprovider = "mapping"\nverify = "none"\n',
        *mapping_table({**MAPPING, **changes}),
    ]
    path = tmp_path / "relay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mapping_table(mapping: dict[str, Any]) -> list[str]:
    """The TOML lines of a `[sources.mapping]` table."""
    lines = ["[sources.mapping]"]
    for key, value in mapping.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for table in ("usage", "types"):
        lines.append(f"[sources.mapping.{table}]")
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in mapping[table].items()]
    return lines


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60
    )


def test_sources_check_prints_canonical_events(tmp_path: Path) -> None:
    """`relay sources check` prints each canonical event of a payload as one JSON line."""
    config = mapping_toml(tmp_path)
    payload = tmp_path / "event.json"
    events = json.loads((ROOT / "mapping" / "events.json").read_text())
    payload.write_text(json.dumps(events[5]))
    done = run("sources", "check", "--config", str(config), "--source", "responses", str(payload))
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    event = json.loads(line)
    assert event["type"] == "agent.chat.turn.completed"
    assert (event["id"], event["session_id"], event["turn_id"]) == ("wh_06", "sess_oa_42", "resp_1")
    assert event["data"]["usage"]["total_tokens"] == 1820
    assert not (tmp_path / "cli.db").exists()


def test_sources_check_names_the_bad_frame(tmp_path: Path) -> None:
    """A stream with a malformed frame is refused, naming the frame, as ingest would."""
    config = tmp_path / "relay.toml"
    config.write_text('[[sources]]\nid = "casey"\nprovider = "casey"\nverify = "none"\n')
    stream = tmp_path / "chat.sse"
    stream.write_bytes((ROOT / "casey" / "chat_1.sse").read_bytes() + b"data: {oops\n\n")
    done = run("sources", "check", "--config", str(config), "--source", "casey", str(stream))
    assert done.returncode == 1
    assert "INVALID_EVENT" in done.stderr
    assert "frame 9" in done.stderr


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"session": "data/session/id"}, "sources.0.mapping.session"),
        ({"turn": "/data/~2response"}, "sources.0.mapping.turn"),
        ({"types": {"response.created": "turn.begun"}}, "sources.0.mapping.types.response.created"),
    ],
)
def test_bad_mapping_is_refused_at_start_up(
    tmp_path: Path, change: dict[str, object], key: str
) -> None:
    """A mapping with a bad pointer or an unknown target type stops start-up, naming it."""
    config = mapping_toml(tmp_path, **change)
    done = run("serve", "--config", str(config), "--port", "0")
    assert done.returncode == 2
    assert key in done.stderr


def demo_toml(tmp_path: Path, provider: str) -> Path:
    verify = f'verify = "bearer"\nsecrets = ["{BEARER_TOKEN}"]'
    if provider != "motus":
        verify = f'verify = "standard-webhooks"\nsecrets = ["{SECRET}"]'
    path = tmp_path / "demo.toml"
    lines = [f'[[sources]]\nid = "{provider}"\nprovider = "{provider}"\n{verify}\n']
    if provider == "mapping":
        lines += mapping_table(MAPPING)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "provider", ["casedev", "motus", "llamacloud", "scriberr", "casey", "mapping"]
)
async def test_send_demo_drives_each_provider(
    start_relay: RelayFactory, tmp_path: Path, provider: str
) -> None:
    """`relay send --demo --provider NAME` gives sessions of that provider with turns that end."""
    table: dict[str, Any] = {"id": provider, "provider": provider}
    if provider == "motus":
        table.update(verify="bearer", secrets=[BEARER_TOKEN])
    else:
        table.update(verify="standard-webhooks", secrets=[SECRET])
    if provider == "mapping":
        table["mapping"] = MAPPING
    relay = await start_relay(sources=[table])
    url = str(relay.client.make_url(""))
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "send", "--demo", "--provider", provider),
        *("--config", str(demo_toml(tmp_path, provider)), "--url", url, "--delay", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out, err)
    resp = await relay.client.get("/v1/sessions", headers=relay.auth)
    sessions = (await resp.json())["items"]
    assert len(sessions) == 3
    assert {s["provider"] for s in sessions} == {provider}
    assert {s["readiness"] for s in sessions} == {"ready"}
    assert {s["turn_status"] for s in sessions} == {"idle"}
    assert sum(s["counts"]["failed"] for s in sessions) >= 1
    assert all(s["counts"]["completed"] >= 1 for s in sessions)
