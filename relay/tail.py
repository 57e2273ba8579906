"""`relay tail`: follow the change stream in a terminal, resuming after disconnects."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TextIO

import aiohttp
import orjson

KEY_HINT = (
    "give an API key with scope agent:read in the RELAY_API_KEY environment variable"
    " (or --key, which other users can see in the process list)"
)


def describe(change: dict[str, Any]) -> str:
    """One readable line per change."""
    session = change.get("session") or {}
    turn = change.get("turn") or {}
    parts = [
        f"#{change['id']:<6}",
        change["occurred_at"],
        f"{change['type']:<22}",
        change["session_id"],
    ]
    if change.get("turn_id"):
        parts.append(f"turn={change['turn_id']}")
    if turn.get("status"):
        parts.append(f"status={turn['status']}")
    if change["type"].startswith("session."):
        parts.append(f"readiness={session.get('readiness')}")
    if turn.get("error"):
        parts.append(f"error={turn['error'].get('message')!r}")
    return "  ".join(str(part) for part in parts)


async def tail(
    url: str,
    key: str | None,
    types: list[str],
    sessions: list[str],
    last_id: int | None,
    count: int | None,
    out: TextIO = sys.stdout,
    raw: bool = False,
    retry_seconds: float = 1.0,
    on_connect: Callable[[], None] | None = None,
) -> int:
    """Print changes until `count` were shown (or forever), reconnecting with the last id."""
    shown = 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    params = [("type", t) for t in types] + [("session_id", s) for s in sessions]
    # A stream sends a heartbeat every 15 s by default: a minute of silence means the
    # connection is dead even if the socket does not say so.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        while count is None or shown < count:
            query = params + ([("last_event_id", str(last_id))] if last_id is not None else [])
            try:
                async with http.get(f"{url.rstrip('/')}/v1/stream", params=query) as resp:
                    if resp.status >= 500:
                        print(f"relay tail: {resp.status}; retrying", file=sys.stderr)
                        await asyncio.sleep(retry_seconds)
                        continue
                    if resp.status == 401:
                        print(f"relay tail: 401 {await resp.text()}; {KEY_HINT}", file=sys.stderr)
                        return 1
                    if resp.status != 200:
                        text = await resp.text()
                        print(f"relay tail: {resp.status} {text}", file=sys.stderr)
                        return 1
                    if on_connect is not None:
                        on_connect()
                    async for event, data, change_id in _frames(resp):
                        if change_id is not None:
                            last_id = change_id
                        if data is None or event.startswith("stream."):
                            continue  # a control event (the position after the replay, ...)
                        change = orjson.loads(data)
                        print(data.decode() if raw else describe(change), file=out, flush=True)
                        shown += 1
                        if count is not None and shown >= count:
                            return 0
            except (TimeoutError, aiohttp.ClientError) as exc:
                print(f"relay tail: disconnected ({exc}); resuming", file=sys.stderr)
            await asyncio.sleep(retry_seconds)
    return 0


async def _frames(resp: aiohttp.ClientResponse) -> Any:
    """(event name, data or None, id or None) for each frame that carries data or an id."""
    event, change_id, data = "", None, b""
    async for line in resp.content:
        line = line.rstrip(b"\r\n")
        if not line:
            if change_id is not None or data:
                yield event, (data or None), change_id
            event, change_id, data = "", None, b""
        elif line.startswith(b"id: "):
            change_id = int(line[4:])
        elif line.startswith(b"event: "):
            event = line[7:].decode("utf-8", "replace")
        elif line.startswith(b"data: "):
            data = line[6:]
