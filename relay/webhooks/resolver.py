"""Name resolution for deliveries on threads of its own.

`getaddrinfo` blocks a thread for as long as a name takes to resolve. aiohttp's
`ThreadedResolver` uses the event loop's default executor (a handful of threads, shared
with everything else), so a few slow names delay every other one; this resolver keeps a
larger pool for deliveries alone.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult

DEFAULT_THREADS = 32
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class PooledResolver(AbstractResolver):
    """Resolves with `socket.getaddrinfo` on a pool of `threads` threads of its own."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="relay-resolve")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(
            self._executor,
            lambda: socket.getaddrinfo(
                host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
            ),
        )
        results: list[ResolveResult] = []
        for found_family, _, proto, _, address in infos:
            if found_family == socket.AF_INET6:
                if len(address) < 3:  # no IPv6 support in this Python
                    continue
                if address[3]:  # a scope id (link-local): keep it in the host
                    resolved, found_port = await loop.run_in_executor(
                        self._executor, socket.getnameinfo, address, _NUMERIC
                    )
                    resolved_port = int(found_port)
                else:
                    resolved, resolved_port = str(address[0]), int(address[1])
            elif found_family == socket.AF_INET:
                resolved, resolved_port = str(address[0]), int(address[1])
            else:
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=resolved,
                    port=resolved_port,
                    family=found_family,
                    proto=proto,
                    flags=_NUMERIC,
                )
            )
        return results

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
