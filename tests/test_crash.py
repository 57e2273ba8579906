"""Crash safety: `relay serve` SIGKILLed under load loses no acknowledged event."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.sign import sign_standard
from tests.conftest import SECRET, Load
from tests.redis_server import free_port

CLIENTS = 32


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
url = "sqlite:///{tmp_path}/crash.db"
[log]
requests = false
level = "warning"
[[sources]]
id = "casedev"
provider = "casedev"
secrets = ["{SECRET}"]
"""
    )
    return config


class RelayProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "relay", *args, "--config", str(self.config)],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return done.stdout.decode()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relay", "serve", "--config", str(self.config)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("relay did not start within 30 s")

    def children(self) -> list[int]:
        """Pids of the relay's child processes (its writer process)."""
        assert self.proc is not None
        return child_pids(self.proc.pid)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), timeout=10)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), timeout=20)


def child_pids(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, exited but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def ended(pids: list[int], seconds: float) -> bool:
    """Wait up to `seconds` for every process in `pids` to be gone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    port = free_port()
    process = RelayProcess(write_config(tmp_path, port), port)
    process.cli("migrate")  # admin commands need the store to exist
    yield process
    await process.stop()


LIFECYCLE = (
    "agent.chat.session.created",
    "agent.runtime.reused",
    "agent.worker.ready",
    "agent.chat.turn.started",
    "agent.chat.turn.completed",
)


def event(number: int) -> bytes:
    """Events of 50 sessions, so that the crash also cuts through state derivation."""
    return orjson.dumps(
        {
            "id": f"evt_crash_{number:05d}",
            "type": LIFECYCLE[number % len(LIFECYCLE)],
            "occurred_at": f"2026-11-20T09:{number // 60 % 60:02d}:{number % 60:02d}.000Z",
            "data": {
                "chatId": f"chat_{number % 50}",
                "turnId": f"turn_{number // 10}",
                "usage": {"inputTokens": 10, "outputTokens": 5},
            },
        }
    )


async def send_all(
    url: str,
    numbers: list[int],
    acked: set[str],
    killed: asyncio.Event,
    kill_after: int | None = None,
) -> None:
    """Send the numbered events from many clients; `killed` is set once `kill_after` of
    them were acknowledged."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in numbers:
        queue.put_nowait(number)

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            number = queue.get_nowait()
            body = event(number)
            ts = int(time.time())
            headers = {
                "webhook-id": f"msg_{number}",
                "webhook-timestamp": str(ts),
                "webhook-signature": sign_standard(SECRET, f"msg_{number}", ts, body),
            }
            try:
                async with http.post(f"{url}/v1/ingest/casedev", data=body, headers=headers) as r:
                    answer: dict[str, Any] = await r.json()
                    if r.status in (200, 202):
                        acked.add(answer["id"])
                        if kill_after is not None and len(acked) >= kill_after:
                            killed.set()
            except (aiohttp.ClientError, TimeoutError):
                continue

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))


async def stored_ids(url: str, key: str) -> list[str]:
    ids: list[str] = []
    after = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            params = {"after": after, "limit": 1000}
            async with http.get(f"{url}/v1/events", params=params) as resp:
                page = await resp.json()
            ids.extend(item["id"] for item in page["items"])
            if page["next_after"] is None:
                return ids
            after = page["next_after"]


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_event(
    relay_process: RelayProcess, load: Load
) -> None:
    """Every event answered 2xx before a SIGKILL is stored after restart, none twice."""
    events, kill_after = load.crash_events, load.crash_kill_after
    key = relay_process.cli("keys", "create", "--scope", "agent:read").strip().splitlines()[-1]
    await relay_process.start()
    acked: set[str] = set()
    killed = asyncio.Event()
    sending = asyncio.create_task(
        send_all(relay_process.url, list(range(events)), acked, killed, kill_after)
    )
    await asyncio.wait_for(killed.wait(), timeout=60)
    writers = relay_process.children()
    await relay_process.kill()
    acked_before_kill = set(acked)
    await asyncio.wait_for(sending, timeout=60)
    assert len(writers) == 1
    assert await ended(writers, 30), "the writer process outlived the relay"
    assert len(acked_before_kill) >= kill_after
    assert len(acked_before_kill) < events, "the kill came after every event was sent"

    await relay_process.start()
    after_restart = await stored_ids(relay_process.url, key)
    assert len(after_restart) == len(set(after_restart)), "an event is stored twice"
    assert acked <= set(after_restart), f"lost: {sorted(acked - set(after_restart))[:5]}"

    # The senders retry what was not acknowledged: in the end every event is there once.
    missing = [n for n in range(events) if f"evt_crash_{n:05d}" not in set(after_restart)]
    retried: set[str] = set()
    await send_all(relay_process.url, missing, retried, asyncio.Event())
    final = await stored_ids(relay_process.url, key)
    assert sorted(final) == sorted(f"evt_crash_{n:05d}" for n in range(events))

    # Every stored event has its changes, and the state equals a replay of the events.
    await relay_process.stop()
    report = relay_process.cli("check-state")
    assert "match the events" in report


@pytest.mark.slow
async def test_sigterm_under_load_shuts_down_cleanly(
    relay_process: RelayProcess, load: Load
) -> None:
    """SIGTERM mid-load: the relay exits 0 and every acknowledged event is stored."""
    key = relay_process.cli("keys", "create", "--scope", "agent:read").strip().splitlines()[-1]
    await relay_process.start()
    acked: set[str] = set()
    stopping = asyncio.Event()
    numbers = list(range(load.crash_events))
    sending = asyncio.create_task(
        send_all(relay_process.url, numbers, acked, stopping, load.crash_kill_after)
    )
    await asyncio.wait_for(stopping.wait(), timeout=60)
    assert relay_process.proc is not None
    writers = relay_process.children()
    relay_process.proc.terminate()
    assert await asyncio.wait_for(relay_process.proc.wait(), timeout=30) == 0
    assert await ended(writers, 30), "the writer process outlived the relay"
    await asyncio.wait_for(sending, timeout=60)

    await relay_process.start()
    stored = await stored_ids(relay_process.url, key)
    assert acked <= set(stored)
    assert len(stored) == len(set(stored))
