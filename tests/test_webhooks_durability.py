"""Durability: `relay serve` SIGKILLed with deliveries pending resumes them after restart."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import SECRET, Load
from tests.receivers import Receipt, eventually, receiver
from tests.test_crash import RelayProcess, free_port, send_all


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
url = "sqlite:///{tmp_path}/webhooks.db"
[log]
requests = false
level = "warning"
[delivery]
allow_private_networks = true
timeout_seconds = 2
poll_interval_seconds = 0.2
retry_schedule_seconds = [0.2, 0.5, {", ".join(["1"] * 20)}]
[[sources]]
id = "casedev"
provider = "casedev"
secrets = ["{SECRET}"]
"""
    )
    return config


async def call(
    http: aiohttp.ClientSession, method: str, url: str, json: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=json) as resp:
        return resp.status, await resp.json(content_type=None)


async def queue_depth(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^relay_delivery_queue_depth (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


async def all_change_ids(http: aiohttp.ClientSession, base: str) -> list[int]:
    ids: list[int] = []
    after = 0
    while True:
        _, page = await call(http, "GET", f"{base}/v1/changes?after={after}&limit=1000")
        ids.extend(item["id"] for item in page["items"])
        if not page["items"] or page.get("next_after") is None:
            return ids
        after = page["next_after"]


@pytest.mark.slow
async def test_sigkill_with_pending_deliveries_loses_none(tmp_path: Path, load: Load) -> None:
    """SIGKILL with 500+ deliveries pending or retrying: after restart every change reaches
    the receiver, and the session-ordered subscription still gets each session in order."""
    port = free_port()
    relay = RelayProcess(write_config(tmp_path, port), port)
    relay.cli("migrate")  # admin commands need the store to exist
    key = relay.cli("keys", "create", "--scope", "agent:read", "--scope", "agent:write")
    headers = {"Authorization": f"Bearer {key.strip().splitlines()[-1]}"}
    up = [False]

    def until_up(receipt: Receipt, seen: int) -> web.Response:
        return web.Response(status=200 if up[0] else 503)

    try:
        async with receiver() as got, aiohttp.ClientSession(headers=headers) as http:
            await relay.start()
            for path, ordering in (("/any", "none"), ("/ordered", "session")):
                got.endpoint(path, until_up)
                status, created = await call(
                    http,
                    "POST",
                    relay.url + "/v1/subscriptions",
                    {"url": got.url + path, "ordering": ordering},
                )
                assert status == 201
                got.secrets[path] = created["secret"]
            await send_all(relay.url, list(range(load.pending_events)), set(), asyncio.Event())
            for _ in range(600):  # at least 30 s
                if await queue_depth(http, relay.url) >= load.min_pending:
                    break
                await asyncio.sleep(0.05)
            assert await queue_depth(http, relay.url) >= load.min_pending
            assert got.receipts, "no attempt was made before the kill"
            await relay.kill()

            up[0] = True
            await relay.start()
            changes = await all_change_ids(http, relay.url)
            assert len(changes) * 2 >= load.min_pending

            def delivered(path: str) -> set[int]:
                return {r.change_id for r in got.at(path)}

            await eventually(
                lambda: delivered("/any") == delivered("/ordered") == set(changes),
                within=max(40, load.pending_events / 15),
            )
            assert all(r.verified for r in got.receipts)
            by_session: defaultdict[str, list[int]] = defaultdict(list)
            for receipt in got.at("/ordered"):
                ids = by_session[receipt.payload["data"]["session_id"]]
                if receipt.change_id not in ids:
                    ids.append(receipt.change_id)
            for ids in by_session.values():
                assert ids == sorted(ids), ids
    finally:
        await relay.stop()
