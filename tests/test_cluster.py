"""Three `relay serve` processes on one PostgreSQL database and one Redis behave as one
relay: every event stored once, the same derived state as an embedded relay, the same
change stream on every instance, and session-ordered webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from httpx_sse import aconnect_sse

from relay.auth import bootstrap_key
from relay.config import StoreSettings
from relay.store import open_store
from relay.webhooks.secrets import SecretBox
from tests.cluster_support import (
    Node,
    cluster_config,
    lifecycle_events,
    paged,
    send_spread,
    sessions,
    signed,
    wait_until,
    with_repeats,
)
from tests.conftest import SECRET, Relay, RelayFactory
from tests.receivers import Receiver, receiver
from tests.redis_server import free_port
from tests.test_crash import alive

EVENTS = 2000
CLIENTS = 32


@contextlib.asynccontextmanager
async def running(nodes: list[Node]) -> AsyncIterator[list[Node]]:
    """The nodes started together (so that they race to make the shared files)."""
    try:
        await asyncio.gather(*(node.launch() for node in nodes))
        await asyncio.gather(*(node.healthy() for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


async def follow(url: str, key: str, into: list[tuple[int, str]], ready: asyncio.Event) -> None:
    """Collect (change id, type) from an SSE stream until cancelled."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10, read=None)) as http,
        aconnect_sse(http, "GET", url + "/v1/stream") as source,
    ):
        ready.set()
        async for sse in source.aiter_sse():
            if sse.id and not sse.event.startswith("stream."):
                into.append((int(sse.id), sse.event))


def comparable(session: dict[str, Any]) -> dict[str, Any]:
    """A session's state without what depends on where and when it was stored."""
    return {k: v for k, v in session.items() if k not in ("version", "updated_at")}


def session_order_held(got: Receiver, path: str) -> list[str]:
    """Sessions whose deliveries arrived out of change id order."""
    by_session: dict[str, list[int]] = defaultdict(list)
    for receipt in got.at(path):
        by_session[receipt.payload["data"]["session_id"]].append(receipt.change_id)
    return [s for s, ids in by_session.items() if ids != sorted(ids)]


async def test_three_instances_act_as_one_relay(
    tmp_path: Path,
    pg_url: str,
    redis_namespace: tuple[str, str],
    start_relay: RelayFactory,
) -> None:
    """2,000 shuffled lifecycle events (a quarter twice) from 32 clients over three
    instances: stored once each, derived as one embedded relay derives them, streamed
    alike by every instance, and delivered to a webhook in session order."""
    hub_url, prefix = redis_namespace
    work = tmp_path / "cluster"
    work.mkdir()
    delivery = "[delivery]\nallow_private_networks = true\ntimeout_seconds = 5\n"
    config = cluster_config(work, pg_url, hub_url, prefix, secret=None, extra=delivery)
    nodes = [Node(config, work, f"relay-{n}") for n in range(3)]
    nodes[0].cli("migrate")
    key = nodes[0].cli("keys", "create", "--scope", "agent:read", "--scope", "agent:write")
    key = key.strip().splitlines()[-1]
    events = lifecycle_events(EVENTS, seed=12)
    bodies = with_repeats(events, 0.25, seed=12)

    async with running(nodes), receiver() as got:
        # Started together, they generated one source secret and share it.
        generated = orjson.loads((work / "data" / "source-secrets.json").read_bytes())
        secret = generated["casedev"]
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
            resp = await http.post(
                nodes[1].url + "/v1/subscriptions",
                json={"url": got.endpoint("/all"), "ordering": "session"},
            )
            assert resp.status_code == 201, resp.text
            got.secrets["/all"] = resp.json()["secret"]

        streams: list[list[tuple[int, str]]] = [[] for _ in nodes]
        readies = [asyncio.Event() for _ in nodes]
        followers = [
            asyncio.create_task(follow(node.url, key, into, ready))
            for node, into, ready in zip(nodes, streams, readies, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)

        sent = await send_spread([n.url for n in nodes], secret, bodies, CLIENTS)
        assert set(sent.statuses) <= {200, 202}, sorted(set(sent.statuses))
        assert len(sent.statuses) == len(bodies)

        stored = await paged(nodes[2].url, key, "/v1/events")
        stored_ids = [e["id"] for e in stored]
        assert len(stored_ids) == len(set(stored_ids)) == EVENTS
        assert set(sent.acked) == set(stored_ids) == {e["id"] for e in events}

        changes = await paged(nodes[0].url, key, "/v1/changes")
        expected = [(c["id"], c["type"]) for c in changes]

        async def streamed() -> bool:
            return all(len(s) >= len(expected) for s in streams)

        try:
            await wait_until(streamed, 60, "every stream has every change")
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
        for stream in streams:
            assert stream == expected  # in id order, none missing, none twice

        async def delivered() -> bool:
            return len({r.change_id for r in got.at("/all")}) >= len(expected)

        await wait_until(delivered, 30, "the webhook has every change")
        assert {r.change_id for r in got.at("/all")} == {c for c, _ in expected}
        assert all(r.verified for r in got.at("/all"))
        assert session_order_held(got, "/all") == []

        embedded = await start_relay()
        for body in bodies:
            resp = await embedded.client.post(
                "/v1/ingest/casedev", data=body, headers=signed(SECRET, body)
            )
            assert resp.status in (200, 202), await resp.text()
        alone = await sessions_of(embedded)
        clustered = await sessions(nodes[1].url, key)
        assert len(clustered) == len(alone) > 100
        assert {s: comparable(v) for s, v in clustered.items()} == {
            s: comparable(v) for s, v in alone.items()
        }


async def sessions_of(relay: Relay) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        query = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        resp = await relay.client.get("/v1/sessions", params=query, headers=relay.auth)
        page = await resp.json()
        found.update((s["session_id"], s) for s in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return found


STARTER = """
import sys, time
from relay.config import load_settings
from relay.source_secrets import provision
from relay.store import data_directory
from relay.auth import bootstrap_key
from relay.config import StoreSettings
from relay.store import open_store
from relay.webhooks.secrets import SecretBox

settings = load_settings(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
settings, _ = provision(settings)
box = SecretBox.from_config(None, data_directory(settings.store.url))
print(settings.sources[0].secrets[0], box.encrypt("probe", "row").hex())
"""


def test_instances_starting_together_make_one_set_of_generated_files(tmp_path: Path) -> None:
    """Relays started at the same instant on one data directory generate the source
    secret and the encryption key once, and all use those."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[store]\nurl = "postgresql://db.invalid/relay"\n'
        '[[sources]]\nid = "casedev"\nprovider = "casedev"\n'
    )
    at = str(time.time() + 1.5)  # every starter is running by then
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(config), at],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    outputs = [starter.communicate(timeout=60) for starter in starters]
    assert [s.returncode for s in starters] == [0] * 8, outputs[0][1].decode()[-800:]
    stored = orjson.loads((tmp_path / "data" / "source-secrets.json").read_bytes())
    box = SecretBox.from_config(None, tmp_path / "data")
    for out, _ in outputs:
        secret, probe = out.decode().split()
        assert secret == stored["casedev"]
        assert box.decrypt(bytes.fromhex(probe), "row") == "probe"


def two_free_ports() -> int:
    """A port that is free, and the next one too."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two consecutive free ports")


async def run_script(script: str, env: dict[str, str], *args: str) -> Any:
    return await asyncio.to_thread(
        subprocess.run, [script, *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_the_cluster_script_starts_instances_that_share_secrets_and_key(
    tmp_path: Path, pg_url: str, redis_namespace: tuple[str, str]
) -> None:
    """`scripts/cluster start 2` creates the database, migrates it and starts two
    instances that take the same admin key and signed events; `stop` ends them."""
    hub_url, prefix = redis_namespace
    new_database = pg_url + "_script"  # not there yet: the script creates it
    config = cluster_config(tmp_path, new_database, hub_url, prefix, secret=None)
    port = two_free_ports()
    env = {**os.environ, "CONFIG": str(config), "PORT": str(port), "WORKDIR": str(tmp_path)}
    env["PYTHON"] = sys.executable
    script = str(Path(__file__).parent.parent / "scripts" / "cluster")
    try:
        started = await run_script(script, env, "start", "2")
        assert started.returncode == 0, started.stdout + started.stderr
        out = started.stdout
        assert f"created database {new_database.rpartition('/')[2]}" in out
        urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        assert all(url in out for url in urls)
        assert "scripts/cluster stop" in out
        key = next(w for w in out.split() if w.startswith("rk_"))
        secret = next(w for w in out.split() if w.startswith("whsec_"))
        event = lifecycle_events(1, seed=3)[0]
        sent = await send_spread(urls[1:], secret, [orjson.dumps(event)], clients=1)
        assert sent.statuses == [202]
        for url in urls:  # the key made by the first instance works on the second
            assert [e["id"] for e in await paged(url, key, "/v1/events")] == [event["id"]]
    finally:
        stopped = await run_script(script, env, "stop")
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{new_database.rpartition("/")[2]}"')
        finally:
            await admin.close()
    assert stopped.stdout.count("stopped relay-") == 2
    pids = [int(w) for w in stopped.stdout.replace(")", " ").split() if w.isdigit()]
    assert pids
    assert not any(map(alive, pids))


def test_the_cluster_script_takes_a_zombie_for_a_stopped_instance(tmp_path: Path) -> None:
    """An instance that has ended but is not reaped yet (a zombie) is not running: status
    says so and stop neither signals it nor waits for it."""
    ended = subprocess.Popen(["true"])  # never waited for while the script runs
    stat = Path(f"/proc/{ended.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rpartition(") ")[2][:1] != "Z":
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)
    run = tmp_path / "data" / "cluster"
    run.mkdir(parents=True)
    (run / "relay-18080.pid").write_text(str(ended.pid))
    env = {**os.environ, "WORKDIR": str(tmp_path), "PYTHON": sys.executable}
    script = str(Path(__file__).parent.parent / "scripts" / "cluster")
    try:
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
        assert "http://127.0.0.1:18080 not running" in status.stdout, status.stdout
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True)
        assert "stopped" not in stopped.stdout
        assert not (run / "relay-18080.pid").exists()
    finally:
        ended.wait()


async def test_instances_starting_together_make_one_admin_key(pg_url: str) -> None:
    """Of three relays that start together on a fresh database, one makes the bootstrap
    admin key (and shows it); the others find it made."""
    stores = [open_store(StoreSettings(url=pg_url)) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        made = await asyncio.gather(*(bootstrap_key(store) for store in stores))
        keys = await stores[0].list_api_keys()
    finally:
        for store in stores:
            await store.close()
    assert len([key for key in made if key is not None]) == 1
    assert len(keys) == 1
