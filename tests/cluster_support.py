"""Real `relay serve` processes on one PostgreSQL database and one Redis, and the
clients that drive them: signed senders, change-log and session readers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from relay.send import demo_lifecycle
from relay.sign import sign_standard
from tests.redis_server import free_port


def cluster_config(
    directory: Path,
    pg_url: str,
    hub_url: str,
    prefix: str,
    secret: str | None,
    extra: str = "",
    store: str = "",
) -> Path:
    """A configuration every instance shares (each is given its port by the environment);
    without `secret`, the instances generate the source's secret into ./data."""
    secrets = f'secrets = ["{secret}"]' if secret else ""
    config = directory / "cluster.toml"
    config.write_text(
        f"""
[store]
url = "{pg_url}"
{store}
[hub]
url = "{hub_url}"
prefix = "{prefix}"
[log]
requests = false
level = "warning"
[[sources]]
id = "casedev"
provider = "casedev"
{secrets}
{extra}
"""
    )
    return config


class Node:
    """One `relay serve` process of the cluster, run from `directory` (its ./data)."""

    def __init__(self, config: Path, directory: Path, name: str) -> None:
        self.config = config
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "relay", *args, "--config", str(self.config)],
            capture_output=True,
            check=True,
            timeout=60,
            cwd=self.directory,
        )
        return done.stdout.decode()

    async def launch(self) -> None:
        env = {**os.environ, "RELAY_SERVER__PORT": str(self.port)}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "relay", "serve", "--config", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
            )

    async def healthy(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                assert self.proc.returncode is None, self.tail()
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"relay did not start within {within} s: {self.tail()}")

    async def start(self) -> None:
        await self.launch()
        await self.healthy()

    def tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), timeout=10)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def lifecycle_events(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` events of realistic Case.dev session lifecycles (whole sessions first)."""
    events: list[dict[str, Any]] = []
    while len(events) < count:
        events += demo_lifecycle(sessions=50, seed=seed + len(events))
    return events[:count]


def with_repeats(events: Sequence[dict[str, Any]], share: float, seed: int) -> list[bytes]:
    """The events' bodies, `share` of them twice, shuffled."""
    rng = random.Random(seed)
    bodies = [orjson.dumps(e) for e in events]
    bodies += rng.sample(bodies, int(len(bodies) * share))
    rng.shuffle(bodies)
    return bodies


@dataclass
class Sent:
    acked: dict[str, int] = field(default_factory=dict)  # event id -> seq answered 2xx
    statuses: list[int] = field(default_factory=list)  # every answer's status (0: none)
    retry_after: list[str | None] = field(default_factory=list)  # with each 503


def signed(secret: str, body: bytes) -> dict[str, str]:
    event_id = orjson.loads(body)["id"]
    now = int(time.time())
    return {
        "Content-Type": "application/json",
        "webhook-id": f"msg_{event_id}",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard(secret, f"msg_{event_id}", now, body),
    }


async def send_spread(
    urls: Sequence[str],
    secret: str,
    bodies: Sequence[bytes],
    clients: int = 32,
    sent: Sent | None = None,
    pace: float = 0.0,
) -> Sent:
    """Post every body once, from `clients` concurrent clients, client i to urls[i % n];
    `pace` seconds between one client's requests."""
    sent = sent or Sent()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client(http: aiohttp.ClientSession, url: str) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            try:
                async with http.post(
                    f"{url}/v1/ingest/casedev", data=body, headers=signed(secret, body)
                ) as resp:
                    answer = orjson.loads(await resp.read())
                    sent.statuses.append(resp.status)
                    if resp.status in (200, 202):
                        sent.acked[answer["id"]] = answer["seq"]
                    elif resp.status == 503:
                        sent.retry_after.append(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
                sent.statuses.append(0)
            if pace:
                await asyncio.sleep(pace)

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)
    ) as http:
        await asyncio.gather(*(client(http, urls[i % len(urls)]) for i in range(clients)))
    return sent


async def paged(url: str, key: str, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of an id-paged list (`/v1/events`, `/v1/changes`)."""
    items: list[dict[str, Any]] = []
    after = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            query = {**params, "after": after, "limit": 1000}
            async with http.get(url + path, params=query) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            items += page["items"]
            if page["next_after"] is None:
                return items
            after = page["next_after"]


async def sessions(url: str, key: str) -> dict[str, dict[str, Any]]:
    """Every session's state, by id."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            query = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            async with http.get(url + "/v1/sessions", params=query) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            found.update((s["session_id"], s) for s in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return found


async def wait_until(check: Any, within: float, what: str) -> None:
    """Poll the coroutine function `check` until it returns true; fail after `within` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.05)
