"""The SSRF guard: refused addresses, the guarded resolver, real requests and deliveries."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from relay.webhooks.ssrf import BlockedDestination, GuardedResolver, check_url, refusal_reason
from tests.conftest import RelayFactory, fixture_events
from tests.receivers import FAST_DELIVERY, api, receiver, until
from tests.test_read_api import ingest


class FakeResolver(AbstractResolver):
    """Answers every lookup with fixed addresses, without touching the network."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.lookups: list[tuple[str, int, socket.AddressFamily]] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append((host, port, family))
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%2", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("2002:7f00:1::", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("100.64.0.1", "shared address space"),
        ("100.127.255.254", "shared address space"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "private"),
    ],
)
def test_refused_addresses(address: str, kind: str) -> None:
    """Loopback, private, link-local, metadata, shared, special and mapped forms are refused."""
    parsed = ipaddress.ip_address(address)
    reason = refusal_reason(parsed)
    assert reason is not None
    assert kind in reason
    assert reason.startswith(str(parsed))


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700::1", "::ffff:93.184.216.34", "64:ff9b::5db8:d822"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    """Globally routable addresses, also reached through IPv4-mapped or NAT64 forms, pass."""
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_reason_reads_as_a_sentence() -> None:
    """A reason names the address and what it is."""
    assert refusal_reason(ipaddress.ip_address("127.0.0.1")) == "127.0.0.1 is a loopback address"
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert refusal_reason(mapped) == f"{mapped} reaches 127.0.0.1, a loopback address"


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_form_is_judged_like_its_ipv4_address(address: ipaddress.IPv4Address) -> None:
    """An IPv4-mapped IPv6 address is refused exactly when its IPv4 address is."""
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert (refusal_reason(mapped) is None) == (refusal_reason(address) is None)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.1/", "private"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]:8080/hook", "loopback"),
        ("http://[::ffff:192.168.0.1]/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://example.com/hook", None),
        ("http://localhost:8080/hook", None),
        ("https://93.184.216.34/hook", None),
        ("/relative/path", None),
    ],
)
def test_check_url(url: str, kind: str | None) -> None:
    """A literal-IP URL is judged by its address; host names are left to the resolver."""
    reason = check_url(url)
    if kind is None:
        assert reason is None
    else:
        assert reason is not None
        assert kind in reason


async def test_resolver_refuses_a_private_answer() -> None:
    """A host that resolves to a private address raises BlockedDestination with the reason."""
    inner = FakeResolver("10.1.2.3")
    resolver = GuardedResolver(inner)
    with pytest.raises(BlockedDestination) as info:
        await resolver.resolve("hooks.example.com", 443, socket.AF_UNSPEC)
    assert isinstance(info.value, OSError)
    assert info.value.host == "hooks.example.com"
    assert info.value.address == "10.1.2.3"
    assert info.value.reason == "10.1.2.3 is a private address"
    assert "hooks.example.com" in str(info.value)
    assert inner.lookups == [("hooks.example.com", 443, socket.AF_UNSPEC)]


async def test_resolver_refuses_if_any_answer_is_refused() -> None:
    """One refused address among public ones refuses the host."""
    resolver = GuardedResolver(FakeResolver("93.184.216.34", "2606:4700::1", "169.254.169.254"))
    with pytest.raises(BlockedDestination, match="cloud metadata"):
        await resolver.resolve("rebind.example.com", 80)


async def test_resolver_refuses_a_non_address_answer() -> None:
    """An answer that is not an IP address is refused rather than trusted."""
    resolver = GuardedResolver(FakeResolver("not-an-address"))
    with pytest.raises(BlockedDestination, match="not an IP address"):
        await resolver.resolve("odd.example.com", 80)


async def test_resolver_passes_public_answers_through() -> None:
    """Public answers come back unchanged."""
    inner = FakeResolver("93.184.216.34", "2606:4700::1")
    results = await GuardedResolver(inner).resolve("hooks.example.com", 443)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:4700::1"]
    assert all(r["port"] == 443 for r in results)


async def test_resolver_allows_private_networks_when_configured() -> None:
    """With allow_private_networks every answer passes."""
    inner = FakeResolver("127.0.0.1", "10.0.0.1", "169.254.169.254")
    results = await GuardedResolver(inner, allow_private_networks=True).resolve("internal", 80)
    assert [r["host"] for r in results] == ["127.0.0.1", "10.0.0.1", "169.254.169.254"]


async def test_resolver_close_closes_the_inner_resolver() -> None:
    """Closing the guard closes the resolver it wraps."""
    inner = FakeResolver()
    await GuardedResolver(inner).close()
    assert inner.closed


async def _post_via_localhost(
    aiohttp_server: AiohttpServer, *, allow_private_networks: bool
) -> tuple[list[bytes], int | None, aiohttp.ClientConnectorError | None]:
    received: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    resolver = GuardedResolver(allow_private_networks=allow_private_networks)
    status: int | None = None
    error: aiohttp.ClientConnectorError | None = None
    try:
        connector = aiohttp.TCPConnector(resolver=resolver)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.post(
                    f"http://localhost:{server.port}/hook", data=b'{"type":"turn.completed"}'
                ) as response:
                    status = response.status
            except aiohttp.ClientConnectorError as exc:
                error = exc
    finally:
        await resolver.close()
    return received, status, error


async def test_real_request_to_loopback_is_refused(aiohttp_server: AiohttpServer) -> None:
    """A POST to localhost fails with a connector error naming the loopback refusal."""
    received, status, error = await _post_via_localhost(
        aiohttp_server, allow_private_networks=False
    )
    assert received == []
    assert status is None
    assert error is not None
    assert isinstance(error.os_error, BlockedDestination)
    assert error.os_error.host == "localhost"
    assert "loopback" in error.os_error.reason
    assert "loopback" in str(error)


async def test_real_request_to_loopback_is_delivered_when_allowed(
    aiohttp_server: AiohttpServer,
) -> None:
    """With allow_private_networks the same POST reaches the local server."""
    received, status, error = await _post_via_localhost(aiohttp_server, allow_private_networks=True)
    assert error is None
    assert status == 204
    assert received == [b'{"type":"turn.completed"}']


async def test_deliveries_to_private_destinations_are_refused_and_recorded(
    start_relay: RelayFactory,
) -> None:
    """Loopback, private, metadata and a name resolving to loopback: refused, reason recorded."""
    relay = await start_relay(delivery={**FAST_DELIVERY, "allow_private_networks": False})
    async with receiver() as got:
        port = got.url.rsplit(":", 1)[1]
        targets = {
            f"http://127.0.0.1:{port}/hook": "127.0.0.1 is a loopback address",
            "http://10.0.0.1/hook": "10.0.0.1 is a private address",
            "http://169.254.169.254/latest/meta-data": "a cloud metadata address",
            f"http://localhost:{port}/hook": "a loopback address",
        }
        ids = {}
        for url in targets:
            created = await api(relay, "POST", "/v1/subscriptions", status=201, json={"url": url})
            ids[url] = created["id"]
        await ingest(relay, fixture_events()[0])

        async def all_failed() -> bool:
            for sub_id in ids.values():
                path = f"/v1/subscriptions/{sub_id}/deliveries"
                if not (await api(relay, "GET", path, params={"status": "failed"}))["items"]:
                    return False
            return True

        await until(all_failed)  # failed is final: a retry would have kept it retrying
        assert got.receipts == []
    for url, reason in targets.items():
        path = f"/v1/subscriptions/{ids[url]}/deliveries"
        [delivery] = (await api(relay, "GET", path))["items"]
        assert delivery["status"] == "failed"
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] is None
        assert reason in attempt["error"], attempt["error"]
        assert "allow_private_networks" in attempt["error"]
    metrics = await (await relay.client.get("/metrics")).text()
    assert 'relay_deliveries_total{outcome="refused"} 4.0' in metrics


async def test_slow_names_do_not_delay_other_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """While sixteen lookups of a slow name block their threads, another name still
    resolves, and is still checked."""
    real = socket.getaddrinfo
    blocked = threading.Semaphore(0)  # released once by each slow lookup that started
    release = threading.Event()

    def lookup(host: str, port: int, *args: object, **kwargs: object) -> object:
        if host == "slow.example":
            blocked.release()
            release.wait(60)  # until the fast name resolved (a bound, should that hang)
        elif host != "fast.example":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    resolver = GuardedResolver()
    try:
        slow = [asyncio.create_task(resolver.resolve("slow.example", 443)) for _ in range(16)]
        for _ in slow:  # every slow lookup holds its thread
            assert await asyncio.to_thread(blocked.acquire, True, 30)
        [fast] = await asyncio.wait_for(resolver.resolve("fast.example", 443), 30)
        assert not any(task.done() for task in slow)  # resolved while they were blocked
        assert fast["host"] == "93.184.216.34"
        release.set()
        await asyncio.gather(*slow)
    finally:
        release.set()
        await resolver.close()
