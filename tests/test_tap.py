"""The tap: `/v1/tap/{source}/{path}` passes a chat API's answer through unchanged and
stores its frames, against fake platforms on loopback speaking each seed's format."""

from __future__ import annotations

import asyncio
import posixpath
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay.app import STORE
from relay.config import ConfigError, SourceSettings, load_settings
from relay.connectors.frames import FrameMapper
from relay.connectors.sse import SSEParser
from relay.providers import Context, build_provider
from relay.providers.frames import parse_frames
from tests.conftest import Relay, RelayFactory
from tests.fake_upstreams import FIXTURES, STREAMS, ChatPlatform
from tests.test_crash import free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
SESSIONS = {
    "casedev": "chat_cd_7Q",
    "casey": "7b0e2c4d-1f3a-4c55-9d1e-2a9f8c3b6e10",
    "llamacloud": "sess_lc_9",
    "scriberr": "chat_8f2c",
}
# (status, tool calls, usage field, value) of each stream's turn.
TURNS = {
    "casedev": ("completed", 1, "cost_micros", 23500),
    "casey": ("completed", 1, None, None),
    "llamacloud": ("failed", 1, "input_tokens", 900),
    "scriberr": ("completed", 0, "total_tokens", 1520),
}
# Headers that differ between two answers by nature or are the relay's own.
UNCOMPARED = {"date", "x-request-id", "transfer-encoding", "connection", "keep-alive"}


def tap_source(provider: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"id": provider, "provider": provider, "verify": "none", "upstream": upstream, **extra}


async def platform_and_relay(
    aiohttp_server: ServerFactory,
    start_relay: RelayFactory,
    base: str = "",
    **relay_overrides: Any,
) -> tuple[ChatPlatform, TestServer, Relay]:
    platform = ChatPlatform()
    server = await aiohttp_server(platform.app())
    upstream = str(server.make_url(base)).rstrip("/")
    providers = ("casedev", "casey", "llamacloud", "scriberr", "motus")
    sources = [tap_source(p, upstream) for p in providers]
    relay = await start_relay(sources=sources, **relay_overrides)
    return platform, server, relay


def compared(headers: Any) -> list[tuple[str, str]]:
    return sorted(
        (k.decode().lower(), v.decode()) for k, v in headers if k.decode().lower() not in UNCOMPARED
    )


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def last_turn(relay: Relay, session: str) -> dict[str, Any] | None:
    resp = await relay.client.get(f"/v1/sessions/{session}", headers=relay.auth)
    if resp.status != 200:
        return None
    turn: dict[str, Any] | None = (await resp.json())["last_turn"]
    return turn


async def metric(relay: Relay, name: str, labels: str) -> float:
    text = await (await relay.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("provider", sorted(STREAMS))
async def test_tapped_stream_is_byte_identical_and_gives_its_turn(
    provider: str, aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A tapped stream reaches the client exactly as directly, and relay derives its turn."""
    _, server, relay = await platform_and_relay(aiohttp_server, start_relay)
    path, _ = STREAMS[provider]
    body = {"message": "Tell me about this deal", "parts": [{"type": "text", "text": "hi"}]}
    auth = {"Authorization": "Bearer platform-key"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.make_url("/" + path), json=body, headers=auth) as direct,
    ):
        direct_body, direct_headers = await direct.read(), direct.raw_headers
        direct_status = direct.status
    tapped = await relay.client.post(f"/v1/tap/{provider}/{path}", json=body, headers=auth)
    assert tapped.status == direct_status == 200
    assert await tapped.read() == direct_body
    assert compared(tapped.raw_headers) == compared(direct_headers)

    status, tools, field, value = TURNS[provider]
    turn = await eventually(lambda: _with_status(relay, SESSIONS[provider], status))
    assert turn is not None, f"no {status} turn for {provider}"
    assert turn["tool_calls"]["count"] == tools
    if field is not None:
        assert turn["usage"][field] == value
    labels = f'connector="tap",source="{provider}"'
    assert await metric(relay, "relay_connector_bytes_total", labels) >= len(direct_body)
    assert await metric(relay, "relay_connector_frames_total", labels) > 0


async def _with_status(relay: Relay, session: str, status: str) -> dict[str, Any] | None:
    turn = await last_turn(relay, session)
    return turn if turn is not None and turn["status"] == status else None


async def test_caller_authorization_and_body_reach_the_upstream_only_as_sent(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """The upstream gets the caller's method, query, body and Authorization, not Host."""
    platform, server, relay = await platform_and_relay(aiohttp_server, start_relay, "/base")
    resp = await relay.client.put(
        "/v1/tap/casey/echo/here?x=1&y=a%20b",
        data=b"payload",
        headers={"Authorization": "Bearer caller-key", "Host": "elsewhere.example"},
    )
    assert resp.status == 200
    echo = await resp.json()
    assert echo["path"] == "/base/echo/here?x=1&y=a%20b"
    assert echo["host"] == f"{server.host}:{server.port}"
    seen = platform.seen[-1]
    assert (seen.method, seen.body) == ("PUT", b"payload")
    assert seen.headers["Authorization"] == "Bearer caller-key"


@pytest.mark.parametrize(
    ("provider", "path", "session", "active", "retry"),
    [
        ("casedev", "agent/v1/chat/chat_cd_7Q/message", "chat_cd_7Q", "turn_2", 3.0),
        ("motus", "sessions/sess_motus_1/messages", "sess_motus_1", None, 5.0),
    ],
)
async def test_upstream_conflict_is_passed_through_and_recorded(
    provider: str,
    path: str,
    session: str,
    active: str | None,
    retry: float,
    aiohttp_server: ServerFactory,
    start_relay: RelayFactory,
) -> None:
    """An upstream 409 reaches the client unchanged and is a turn in conflict."""
    _, _, relay = await platform_and_relay(aiohttp_server, start_relay)
    resp = await relay.client.post(f"/v1/tap/{provider}/{path}", json={"content": "hello"})
    assert resp.status == 409
    assert resp.headers["Retry-After"] == str(int(retry))
    assert (await resp.json())["error"]["message"] == "A turn is already active on this session"
    turn = await eventually(lambda: _with_status(relay, session, "conflict"))
    assert turn is not None
    assert turn["active_turn_id"] == active
    assert turn["retry_after_seconds"] == retry


async def test_upstream_drop_reaches_the_client_as_a_drop_and_the_turn_stays_open(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A stream the upstream drops is dropped for the client too; its turn is not completed."""
    _, _, relay = await platform_and_relay(aiohttp_server, start_relay)
    received: list[bytes] = []
    async with relay.client.post("/v1/tap/casey/drop/api/chat", json={}) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_into(resp, received)
    assert b"".join(received).startswith(b'data: {"type": "metadata"')
    session = SESSIONS["casey"]
    turn = await eventually(lambda: _with_status(relay, session, "running"))
    assert turn is not None, "the dropped stream's turn was not recorded as running"
    assert turn["tool_calls"]["count"] == 1
    labels = 'connector="tap",source="casey"'
    assert await metric(relay, "relay_connector_upstream_errors_total", labels) == 1


async def read_into(resp: aiohttp.ClientResponse, chunks: list[bytes]) -> None:
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)


async def test_client_gets_every_byte_while_the_store_is_down(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """With the store closed mid-stream, the tapped stream still flows to its end."""
    platform, _, relay = await platform_and_relay(aiohttp_server, start_relay)
    platform.hold = asyncio.Event()
    path, file = STREAMS["casey"]
    async with relay.client.post(f"/v1/tap/casey/{path}", json={}) as resp:
        first = await resp.content.readany()
        await relay.client.app[STORE].close()
        platform.hold.set()
        rest = await resp.read()
    assert first + rest == file.read_bytes()
    labels = 'connector="tap",source="casey"'
    failures = await eventually(
        lambda: metric(relay, "relay_connector_store_failures_total", labels)
    )
    assert failures > 0


ESCAPES = [
    "http://{evil}/x",
    "http:/{evil}/x",
    "https:%2F%2F{evil}/x",
    "//{evil}/x",
    "a//{evil}/x",
    "../../{evil}",
    "a/../../x",
    "a/%2e%2e/%2E%2E/x",
    "a/.%2e/x",
    "a%2Fb",
    "a%2fb",
    "a%5cb",
    "a%5Cb",
    "a\\b",
    "\\\\{evil}/x",
    "x%0d%0aHost:%20{evil}",
    "@{evil}/x",
    "%40{evil}/x",
    "{evil}/x",
]


@pytest.mark.parametrize("escape", ESCAPES)
async def test_the_path_cannot_lead_off_the_upstream(
    escape: str, aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """Absolute URLs, dot segments, encoded slashes and hosts in the path stay or get 400."""
    evil = ChatPlatform()
    evil_server = await aiohttp_server(evil.app())
    platform, server, relay = await platform_and_relay(aiohttp_server, start_relay, "/base")
    where = f"{evil_server.host}:{evil_server.port}"
    target = "/v1/tap/casey/" + escape.format(evil=where)
    status, body = await raw_request(relay, target, f"Host: {where}")
    assert evil.seen == []
    if status == 400:
        assert b'"code":"INVALID_PATH"' in body or b'"code":"BAD_REQUEST"' in body
    else:
        assert status == 200, body
        # As the upstream would resolve it: dot segments and encoded characters too.
        path = platform.seen[-1].path_qs.partition("?")[0]
        assert posixpath.normpath(unquote(path.replace("\\", "/"))).startswith("/base/")
        assert platform.seen[-1].headers["Host"] == f"{server.host}:{server.port}"


async def test_an_absolute_request_target_stays_on_the_upstream(
    aiohttp_server: ServerFactory, start_relay: RelayFactory
) -> None:
    """A request line naming another host (absolute form) does not reach that host."""
    evil = ChatPlatform()
    evil_server = await aiohttp_server(evil.app())
    platform, _, relay = await platform_and_relay(aiohttp_server, start_relay, "/base")
    where = f"{evil_server.host}:{evil_server.port}"
    status, _ = await raw_request(relay, f"http://{where}/v1/tap/casey/x", f"Host: {where}")
    assert evil.seen == []
    if status != 400:
        assert platform.seen[-1].path_qs == "/base/x"


async def raw_request(relay: Relay, target: str, *headers: str) -> tuple[int, bytes]:
    """Send a request line exactly as given (clients would normalise it)."""
    server = relay.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = "\r\n".join([f"GET {target} HTTP/1.1", *headers, "Connection: close", "", ""])
    writer.write(head.encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest


async def test_tap_answers_404_for_a_source_without_upstream_and_502_when_it_is_down(
    start_relay: RelayFactory,
) -> None:
    """A source without upstream is 404 UNKNOWN_SOURCE; an upstream that refuses is 502."""
    down = f"http://127.0.0.1:{free_port()}"
    relay = await start_relay(sources=[tap_source("casey", down), {"id": "plain"}])
    plain = await relay.client.post("/v1/tap/plain/api/chat", json={})
    assert (plain.status, (await plain.json())["error"]["code"]) == (404, "UNKNOWN_SOURCE")
    refused = await relay.client.post("/v1/tap/casey/api/chat", json={})
    assert (refused.status, (await refused.json())["error"]["code"]) == (
        502,
        "UPSTREAM_UNAVAILABLE",
    )
    labels = 'connector="tap",source="casey"'
    assert await metric(relay, "relay_connector_upstream_errors_total", labels) == 1


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"upstream": "ftp://example.com"}, "sources.0.upstream"),
        ({"upstream": "https://user:pw@example.com"}, "sources.0.upstream"),
        ({"upstream": "https://example.com/?q=1"}, "sources.0.upstream"),
        ({"follow_url": "https://example.com/stream"}, "sources.0.follow_url"),
        ({"follow_auto": True}, "follow_auto needs follow_url"),
        ({"tap_session_pattern": "chat/(.*)"}, "sources.0.tap_session_pattern"),
    ],
)
def test_connector_settings_are_checked_at_start_up(table: dict[str, Any], problem: str) -> None:
    """A bad upstream, follow URL or session pattern stops start-up naming the key."""
    with pytest.raises(ConfigError) as raised:
        load_settings(None, sources=[{"id": "s", "verify": "none", **table}])
    assert problem in str(raised.value)


@pytest.mark.parametrize(
    "stream",
    [
        "casedev/respond_1.sse",
        "casey/chat_1.sse",
        "casey/chat_2.sse",
        "llamacloud/stream_2.sse",
        "scriberr/run_1.sse",
        "scriberr/run_2.sse",
    ],
)
def test_a_stream_read_in_batches_gives_the_events_of_the_whole(stream: str) -> None:
    """However a stream is cut into batches, its lifecycle events are those of the whole."""
    provider_name = stream.split("/")[0]
    body = (FIXTURES / stream).read_bytes()
    provider = build_provider(SourceSettings(id="s", provider=provider_name, verify="none"))
    at = datetime(2026, 12, 1, tzinfo=UTC)
    whole = provider.events(
        parse_frames("text/event-stream", body), Context("s", at, "tap_1", "sess")
    )
    raw = SSEParser().feed(body + b"\n\n")
    rng = random.Random(stream)
    for _ in range(30):
        mapper = FrameMapper(provider, "s", "tap_1", "sess")
        cuts = sorted(rng.sample(range(1, len(raw)), min(3, len(raw) - 1)))
        got = []
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            frames = [mapper.frame(f.data, f.name, f.id) for f in raw[start:end]]
            got += mapper.events([f for f in frames if f is not None], at)
        assert lifecycle(got) == lifecycle(whole)


def lifecycle(events: list[Any]) -> list[tuple[Any, ...]]:
    return sorted(
        (e.id, e.type, e.session_id, e.turn_id, e.tool_call_id, e.error, e.usage)
        for e in events
        if e.type != "agent.chat.turn.activity" or e.usage is not None
    )
