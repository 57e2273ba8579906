"""SSRF guard: outbound deliveries go only to public addresses.

The check runs on the *resolved* address, inside the connector's resolver, so the
address that is checked is the address that is connected to (a DNS answer that changes
between a check and the connection cannot slip through). aiohttp does not call the
resolver for a literal IP host, so `check_url` covers those; call it on every URL a
delivery is sent to, and do not follow redirects.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import TypeAlias

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from relay.webhooks.resolver import PooledResolver

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

CLOUD_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


class BlockedDestination(OSError):
    """A delivery host resolved to an address the SSRF guard refuses.

    An OSError, so aiohttp raises it as a `ClientConnectorError` whose `os_error` is
    this exception.
    """

    def __init__(self, host: str, address: str, reason: str) -> None:
        message = (
            f"refused to connect to {host}: {reason} "
            "(set delivery.allow_private_networks to allow it)"
        )
        super().__init__(errno.EACCES, message)
        self.host = host
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)


def _kind(address: IPAddress) -> str | None:
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address in CLOUD_METADATA:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in SHARED_ADDRESS_SPACE:
        return "in the shared address space 100.64.0.0/10"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why a delivery to `address` is refused, or None if it is a public address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, 6to4, NAT64) are judged by the
    IPv4 address they reach.
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            kind = _kind(inner)
            return None if kind is None else f"{address} reaches {inner}, {kind}"
    kind = _kind(address)
    return None if kind is None else f"{address} is {kind}"


def check_url(url: str) -> str | None:
    """Why `url` is refused if its host is a literal IP address, else None.

    Host names are checked when they are resolved, by `GuardedResolver`.
    """
    host = URL(url).host
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return refusal_reason(address)


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and refuses the host if any address it resolves to is refused."""

    def __init__(
        self, inner: AbstractResolver | None = None, *, allow_private_networks: bool = False
    ) -> None:
        self._inner = inner if inner is not None else PooledResolver()
        self._allow_private_networks = allow_private_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private_networks:
            return results
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                raise BlockedDestination(
                    host, result["host"], f"{result['host']!r} is not an IP address"
                ) from None
            reason = refusal_reason(address)
            if reason is not None:
                raise BlockedDestination(host, result["host"], reason)
        return results

    async def close(self) -> None:
        await self._inner.close()
