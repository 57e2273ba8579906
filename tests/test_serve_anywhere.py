"""`relay serve` works from any working directory, even one holding a `relay/` folder."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from relay.sign import sign_standard
from tests.conftest import SECRET
from tests.test_crash import free_port


async def ingest_status(url: str) -> int:
    """Wait for /healthz, then send one signed event; the ingest answer's status."""
    body = orjson.dumps(
        {
            "id": "evt_anywhere",
            "type": "agent.chat.session.created",
            "occurred_at": "2026-11-20T09:00:00.000Z",
            "data": {"chatId": "chat_anywhere"},
        }
    )
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_anywhere",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SECRET, "msg_anywhere", ts, body),
    }
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        async with http.post(f"{url}/v1/ingest/casedev", data=body, headers=headers) as resp:
            return resp.status


# An empty folder, and the start of another package named `relay` (a source checkout).
@pytest.mark.parametrize("files", [(), ("__init__.py", "store/__init__.py")])
async def test_serve_ingests_from_a_directory_holding_a_relay_folder(
    tmp_path: Path, files: tuple[str, ...]
) -> None:
    """Ingest is stored (202) when `relay serve` runs in a directory with a `relay/` folder."""
    (tmp_path / "relay" / "store").mkdir(parents=True)
    for name in files:
        (tmp_path / "relay" / name).write_text("")
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = {port}\n[store]\nurl = "sqlite:///data/relay.db"\n'
        '[log]\nrequests = false\nlevel = "warning"\n'
        f'[[sources]]\nid = "casedev"\nprovider = "casedev"\nsecrets = ["{SECRET}"]\n'
        "[auth]\nenabled = false\n"
    )
    relay = Path(sys.executable).with_name("relay")
    proc = await asyncio.create_subprocess_exec(
        *(str(relay), "serve", "--config", "relay.toml"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert await ingest_status(f"http://127.0.0.1:{port}") == 202
        assert (tmp_path / "data" / "relay.db").exists()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=20)
