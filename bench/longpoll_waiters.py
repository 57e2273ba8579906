"""Holds N long-poll requests open against a relay until killed (used by bench/longpoll.py).

Each waiter asks for one session with `wait=true` and its current version, and asks
again whenever it is answered, so N requests are always waiting. Prints one line per
answer that came because the session changed, with the time it took.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop


async def waiter(http: aiohttp.ClientSession, url: str, session_id: str) -> None:
    version = 0
    while True:
        params = {"wait": "true", "version": str(version), "timeout": "60"}
        async with http.get(f"{url}/v1/sessions/{session_id}", params=params) as resp:
            body = await resp.json()
        version = body["version"]


async def main(url: str, count: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(waiter(http, url, f"chat_wait_{n:03d}") for n in range(count)))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
