"""Follow: relay reads a session's stream from its stored position, through disconnects,
a SIGKILL, upstream failures and silence; one instance at a time runs each follow."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay import auth
from relay.app import STORE
from relay.config import ConnectorSettings, SourceSettings, StoreSettings
from relay.connectors.backoff import backoff_delay
from relay.connectors.follow import Followed, Follower
from relay.connectors.sse import SSEParser
from relay.connectors.stats import ConnectorStats
from relay.ingest import Source
from relay.send import signed_headers
from relay.store import open_store
from tests.conftest import SECRET, Relay, RelayFactory
from tests.fake_upstreams import CaseStream, case_frames
from tests.test_crash import RelayProcess, free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
FAST = {"follow_poll_seconds": 0.05, "follow_lease_seconds": 2}


def follow_source(server: TestServer, **extra: Any) -> dict[str, Any]:
    return {
        "id": "cd",
        "provider": "casedev",
        "verify": "standard-webhooks",
        "secrets": [SECRET],
        "follow_url": str(server.make_url("/agent/v1/chat/{session_id}/stream")).replace(
            "%7Bsession_id%7D", "{session_id}"
        ),
        "follow_backoff_seconds": 0.05,
        "follow_backoff_max_seconds": 0.2,
        **extra,
    }


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def follows(http: Any, base: str, key: str) -> list[dict[str, Any]]:
    async with http.get(
        f"{base}/v1/sources/cd/follows", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        items: list[dict[str, Any]] = (await resp.json())["items"]
        return items


async def relay_follows(relay: Relay) -> list[dict[str, Any]]:
    resp = await relay.client.get("/v1/sources/cd/follows", headers=relay.auth)
    assert resp.status == 200
    items: list[dict[str, Any]] = (await resp.json())["items"]
    return items


async def in_state(relay: Relay, state: str, **fields: Any) -> dict[str, Any] | None:
    items = await relay_follows(relay)
    for item in items:
        if item["state"] == state and all(item[k] == v for k, v in fields.items()):
            return item
    return None


def test_sse_parser_gives_the_same_frames_however_the_bytes_are_cut() -> None:
    """Frames parsed from any split of the bytes are those of the whole body."""
    body = b'id: 1\nevent: a\ndata: {"x": 1}\r\n\r\n: comment\n\nid: 2\r\ndata: {}\rdata: 2\r\r'
    whole = SSEParser().feed(body)
    assert [(f.id, f.name, f.data) for f in whole] == [
        ("1", "a", b'{"x": 1}'),
        ("2", None, b"{}\n2"),
    ]
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(body)), 5))
        parser, frames = SSEParser(), []
        for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
            frames += parser.feed(body[start:end])
        assert frames == whole
    assert whole[-1].last_id == "2"


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    """Each failure in a row doubles the wait, jittered between half and all, up to the cap."""
    assert backoff_delay(1, 1.0, 60.0, 0.0) == 0.5
    assert backoff_delay(1, 1.0, 60.0, 0.999) < 1.0
    assert backoff_delay(4, 1.0, 60.0, 1.0) == 8.0
    assert backoff_delay(40, 1.0, 60.0, 1.0) == 60.0


async def test_follow_api_starts_and_lists_follows_with_scopes(
    aiohttp_server: ServerFactory, start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST needs agent:write and starts a follow with its headers; GET lists it."""
    monkeypatch.setenv("RELAY_TEST_FOLLOW_AUTH", "Bearer platform-key")
    upstream = CaseStream(case_frames(1))
    server = await aiohttp_server(upstream.app())
    headers = {"Authorization": "env:RELAY_TEST_FOLLOW_AUTH"}
    source = follow_source(server, follow_headers=headers)
    relay = await start_relay(sources=[source], connectors=FAST)
    created = await relay.client.post(
        "/v1/sources/cd/follows", json={"session_id": "chat_F"}, headers=relay.auth
    )
    assert created.status == 202
    assert (await created.json())["state"] == "following"
    assert (await relay.client.post("/v1/sources/cd/follows", json={})).status == 401
    bad = await relay.client.post("/v1/sources/cd/follows", json={}, headers=relay.auth)
    assert (bad.status, (await bad.json())["error"]["code"]) == (400, "INVALID_REQUEST")
    unknown = await relay.client.get("/v1/sources/nope/follows", headers=relay.auth)
    assert unknown.status == 404
    await upstream.publish(5)
    item = await eventually(lambda: in_state(relay, "following", position="5"))
    assert item is not None
    assert item["attempts"] == 0
    assert upstream.authorizations == ["Bearer platform-key"]
    reader = await relay.client.post(
        "/v1/sources/cd/follows",
        json={"session_id": "x"},
        headers={"Authorization": f"Bearer {await read_only_key(relay)}"},
    )
    assert reader.status == 403


async def read_only_key(relay: Relay) -> str:
    return (await auth.create_key(relay.client.app[STORE], "reader", (auth.READ,))).secret


async def test_follow_backs_off_while_the_upstream_fails_counting_attempts(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """Upstream 5xx answers are retried with backoff, counted, then the follow goes on."""
    upstream = CaseStream(case_frames(1), fail=4)
    server = await aiohttp_server(upstream.app())
    relay = await start_relay(sources=[follow_source(server)], connectors=FAST)
    await relay.client.post(
        "/v1/sources/cd/follows", json={"session_id": "chat_F"}, headers=relay.auth
    )
    failing = await eventually(lambda: in_state(relay, "backoff"))
    assert failing is not None
    assert failing["attempts"] >= 1
    assert "503" in failing["last_error"]
    await upstream.publish(5)
    done = await eventually(lambda: in_state(relay, "following", position="5", attempts=0))
    assert done is not None
    assert upstream.statuses[:5] == [503, 503, 503, 503, 200]
    text = await (await relay.client.get("/metrics")).text()
    assert 'relay_connector_upstream_errors_total{connector="follow",source="cd"} 4.0' in text


async def test_silent_stream_is_stopped_after_idle_seconds(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A stream that sends nothing for follow_idle_seconds is stopped as idle."""
    upstream = CaseStream(case_frames(1), silent=True)
    server = await aiohttp_server(upstream.app())
    source = follow_source(server, follow_idle_seconds=0.5)
    relay = await start_relay(sources=[source], connectors=FAST)
    started = time.monotonic()
    await relay.client.post(
        "/v1/sources/cd/follows", json={"session_id": "chat_F"}, headers=relay.auth
    )
    idle = await eventually(lambda: in_state(relay, "idle"))
    assert idle is not None
    assert time.monotonic() - started >= 0.5
    assert len(upstream.connections) == 1


async def test_deleted_session_stops_its_follow(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """An upstream 404 for the session's stream stops the follow as deleted."""
    upstream = CaseStream(case_frames(1))
    server = await aiohttp_server(upstream.app())
    relay = await start_relay(sources=[follow_source(server)], connectors=FAST)
    await relay.client.post(
        "/v1/sources/cd/follows", json={"session_id": "gone"}, headers=relay.auth
    )
    assert await eventually(lambda: in_state(relay, "deleted", session_id="gone")) is not None
    assert upstream.statuses == [404]


async def test_follow_auto_follows_new_sessions_of_its_source(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """With follow_auto, a session the source reports for the first time is followed."""
    upstream = CaseStream(case_frames(2))
    await upstream.publish(10)
    server = await aiohttp_server(upstream.app())
    table = follow_source(server, follow_auto=True)
    relay = await start_relay(sources=[table], connectors=FAST)
    body = (
        b'{"id": "evt_1", "type": "agent.chat.session.created", '
        b'"occurred_at": "2026-12-01T00:00:00Z", "data": {"chatId": "chat_F"}}'
    )
    headers = signed_headers(SourceSettings(**table), body)
    assert (await relay.client.post("/v1/ingest/cd", data=body, headers=headers)).status == 202
    item = await eventually(
        lambda: in_state(relay, "following", session_id="chat_F", position="10")
    )
    assert item is not None
    session = await (await relay.client.get("/v1/sessions/chat_F", headers=relay.auth)).json()
    assert session["counts"]["completed"] == 2


async def test_a_follow_moves_to_another_instance_when_its_holder_dies(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """A follow whose instance stops renewing its lease is taken over from its position."""
    upstream = CaseStream(case_frames(4))
    server = await aiohttp_server(upstream.app())
    table = {**follow_source(server), "verify": "none", "secrets": []}
    settings = SourceSettings(**table)
    store = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/lease.db", writer="thread"))
    await store.open()
    options = ConnectorSettings(follow_poll_seconds=0.05, follow_lease_seconds=0.5)
    followed = {"cd": Followed(Source.from_settings(settings), settings)}
    async with aiohttp.ClientSession() as http:
        first = Follower(followed, store, ConnectorStats(), lambda: http, options)
        second = Follower(followed, store, ConnectorStats(), lambda: http, options)
        await store.start_follow("cd", "chat_F", "2026-12-01T00:00:00.000Z")
        running = asyncio.create_task(first.run())
        await upstream.publish(5)

        async def position() -> str | None:
            (item,) = await store.list_follows("cd")
            return item.position if item.owner == first.owner else None

        assert await eventually(lambda: _equals(position, "5")) is True
        other = asyncio.create_task(second.run())
        await asyncio.sleep(0.2)
        (held,) = await store.list_follows("cd")
        assert held.owner == first.owner  # a live holder keeps it
        running.cancel()  # the first instance dies: its lease is not renewed, nor released
        for task in list(first._running.values()):
            task.cancel()
        await upstream.publish(20)

        async def taken() -> bool:
            (item,) = await store.list_follows("cd")
            return item.owner == second.owner and item.position == "20"

        assert await eventually(taken) is True
        assert upstream.connections[-1] == "5"  # resumed from the stored position
        assert not await store.update_follow(first.owner, "cd", "chat_F", {"position": "1"}, "x")
        other.cancel()
        await second.stop()
    await store.close()


async def _equals(read: Callable[[], Awaitable[Any]], value: Any) -> bool:
    return bool(await read() == value)


# -- a real `relay serve`, disconnected at 10 points and SIGKILLed once ---------------------


@pytest.fixture
async def case_stream(
    aiohttp_server: ServerFactory,
) -> tuple[CaseStream, TestServer]:
    frames = case_frames(10)
    ids = [frame_id for frame_id, _, _ in frames]
    cuts = set(random.Random(15).sample(ids[:-1], 10))
    upstream = CaseStream(frames, cuts=cuts)
    return upstream, await aiohttp_server(upstream.app())


def follow_config(tmp_path: Path, port: int, server: TestServer) -> Path:
    url = f"http://{server.host}:{server.port}/agent/v1/chat/{{session_id}}/stream"
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
url = "sqlite:///{tmp_path}/follow.db"
[log]
requests = false
[connectors]
follow_poll_seconds = 0.1
follow_lease_seconds = 1
[[sources]]
id = "cd"
provider = "casedev"
verify = "none"
follow_url = "{url}"
follow_backoff_seconds = 0.05
follow_backoff_max_seconds = 0.2
"""
    )
    return config


async def test_follow_stores_every_frame_once_through_disconnects_and_a_sigkill(
    tmp_path: Path, case_stream: tuple[CaseStream, TestServer]
) -> None:
    """Cut at 10 points and SIGKILLed once, a follow ends with every frame stored once."""
    upstream, server = case_stream
    port = free_port()
    relay = RelayProcess(follow_config(tmp_path, port, server), port)
    relay.cli("migrate")
    key = relay.cli("keys", "create", "--scope", "agent:read", "--scope", "agent:write")
    key = key.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    await relay.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{relay.url}/v1/sources/cd/follows", json={"session_id": "chat_F"}, headers=auth
            ) as resp:
                assert resp.status == 202

            async def at_least(n: int) -> bool:
                items = await follows(http, relay.url, key)
                return bool(items and items[0]["position"] and int(items[0]["position"]) >= n)

            for _ in range(25):
                await upstream.publish()
                await asyncio.sleep(0.02)
            assert await eventually(lambda: at_least(20)) is True
            await relay.kill()
            restart = len(upstream.connections)
            for _ in range(25):
                await upstream.publish()
                await asyncio.sleep(0.02)
            await relay.start()
            assert await eventually(lambda: at_least(50), seconds=30) is True
            (item,) = await follows(http, relay.url, key)
            assert item["state"] == "following"
            assert item["reconnects"] >= 1
            events = await stored_events(http, relay.url, auth)
            session = await (await http.get(f"{relay.url}/v1/sessions/chat_F", headers=auth)).json()
    finally:
        await relay.stop()
    assert not upstream.cuts, "every cut point was reached"
    counted = Counter(e["id"] for e in events)
    assert all(n == 1 for n in counted.values())
    lifecycle = {
        frame_id
        for frame_id, event, _ in upstream.frames
        if event in ("turn.started", "session.usage", "turn.completed")
    }
    assert lifecycle <= set(counted)
    assert "999" not in counted  # the half frame of each cut is never read
    types = Counter(e["type"] for e in events)
    assert types["agent.chat.turn.started"] == types["agent.chat.turn.completed"] == 10
    # Each connection resumes from the stored position, which never goes back; the
    # restarted relay resumes from where the killed one had stored.
    positions = [int(p or 0) for p in upstream.connections]
    assert positions == sorted(positions)
    assert positions[restart] >= 20
    assert len(upstream.connections) >= 11  # the first, one after each of the 10 cuts
    assert session["counts"] == {"turns": 10, "completed": 10, "failed": 0, "conflicts": 0}
    assert session["turn_status"] == "idle"


async def stored_events(http: Any, base: str, auth: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = 0
    while True:
        async with http.get(
            f"{base}/v1/events", params={"after": after, "limit": 1000}, headers=auth
        ) as resp:
            page = await resp.json()
        items += page["items"]
        if page["next_after"] is None:
            return items
        after = page["next_after"]
