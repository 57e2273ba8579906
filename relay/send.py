"""`relay send`: sign events the way a source does and post them to a running relay."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from relay.config import SourceSettings, VerifyScheme
from relay.providers.demo import DemoRequest
from relay.sign import sign_hmac_hex, sign_standard
from relay.timefmt import format_time, utcnow


def signed_headers(
    source: SourceSettings,
    body: bytes,
    now: int | None = None,
    msg_id: str | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    """The headers that make `body` pass `source`'s verification; `msg_id` is the
    request's id (for a forwarded stream, the stream's)."""
    now = int(time.time()) if now is None else now
    headers = {"Content-Type": content_type}
    secret = next(iter(source.secrets), "")
    match source.verify:
        case VerifyScheme.STANDARD_WEBHOOKS:
            secret = next((s for s in source.secrets if not s.startswith("whpk_")), "")
            if not secret:
                raise ValueError(f"source {source.id!r} has no whsec_ secret to sign with")
            msg_id = msg_id or "msg_" + uuid.uuid4().hex
            prefix = source.header_prefix
            headers[prefix + "id"] = msg_id
            headers[prefix + "timestamp"] = str(now)
            headers[prefix + "signature"] = sign_standard(secret, msg_id, now, body)
        case VerifyScheme.HMAC_SHA256:
            stamp = now if source.timestamp_header else None
            signature = source.signature_prefix + sign_hmac_hex(secret, body, stamp)
            headers[source.signature_header] = signature
            if source.timestamp_header:
                headers[source.timestamp_header] = str(now)
        case VerifyScheme.BEARER:
            headers["Authorization"] = f"Bearer {secret}"
        case VerifyScheme.NONE:
            pass
    return headers


def demo_lifecycle(
    sessions: int = 3, end: datetime | None = None, seed: int | None = None
) -> list[dict[str, Any]]:
    """A realistic Case.dev-style lifecycle for several chat sessions, in occurrence order.

    Of every three sessions the second has a turn rejected with a conflict and the third
    a turn that fails; the rest of their turns complete (with usage), or fail at random,
    except each session's first turn, which always completes.
    The newest event happened at `end` (default now), so none is dated in the future.
    """
    rng = random.Random(seed)
    start = datetime(2000, 1, 1, tzinfo=UTC)  # moved to end at `end` below
    events: list[tuple[datetime, dict[str, Any]]] = []
    for index in range(sessions):
        chat = f"chat_demo_{uuid.uuid4().hex[:8]}"
        t = start + timedelta(seconds=index * 0.7)
        kind = index % 3
        for event_type, data, at in _session_events(rng, chat, t, kind == 1, kind == 2):
            events.append((at, {"type": event_type, "data": {"chatId": chat, **data}}))
    events.sort(key=lambda pair: pair[0])
    shift = (end or utcnow()) - events[-1][0] if events else timedelta()
    return [
        {"id": f"evt_{uuid.uuid4().hex[:16]}", "occurred_at": format_time(t + shift), **body}
        for t, body in events
    ]


def _session_events(
    rng: random.Random, chat: str, t: datetime, conflict: bool, failure: bool
) -> Iterator[tuple[str, dict[str, Any], datetime]]:
    sandbox = f"sbx_{rng.randrange(16**4):04x}"
    yield "agent.chat.session.created", {"agentId": "agt_legal_research"}, t
    t += timedelta(milliseconds=rng.randint(300, 900))
    yield "agent.runtime.reused", {"sandboxId": sandbox}, t
    t += timedelta(milliseconds=rng.randint(300, 900))
    yield "agent.scope.activated", {"sandboxId": sandbox, "scope": {"type": "matter"}}, t
    t += timedelta(milliseconds=rng.randint(500, 1500))
    yield "agent.worker.ready", {"sandboxId": sandbox}, t
    turns = rng.randint(2, 4)
    for number in range(1, turns + 1):
        turn = f"turn_{number:03d}"
        t += timedelta(seconds=rng.uniform(1, 3))
        yield "agent.chat.turn.started", {"turnId": turn}, t
        if conflict and number == 1:
            yield (
                "agent.chat.turn.conflict",
                {"turnId": "turn_retry", "activeTurnId": turn, "retryAfter": 5},
                t + timedelta(milliseconds=400),
            )
        t += timedelta(seconds=rng.uniform(2, 6))
        if (failure and number == turns) or (number > 1 and rng.random() < 0.1):
            error = {"code": "TOOL_TIMEOUT", "message": "vault search timed out"}
            yield "agent.chat.turn.failed", {"turnId": turn, "error": error}, t
        else:
            usage = {
                "inputTokens": rng.randint(800, 6000),
                "outputTokens": rng.randint(100, 1200),
                "costMicros": rng.randint(2000, 40000),
            }
            yield "agent.chat.turn.completed", {"turnId": turn, "usage": usage}, t


async def send_events(
    url: str, source: SourceSettings, events: Sequence[dict[str, Any]], delay: float = 0.0
) -> list[tuple[int, dict[str, Any]]]:
    """Post each event signed; return (status, answer) per event."""
    answers = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for index, event in enumerate(events):
            if index and delay:
                await asyncio.sleep(delay)
            body = orjson.dumps(event)
            target = f"{url.rstrip('/')}/v1/ingest/{source.id}"
            async with http.post(target, data=body, headers=signed_headers(source, body)) as resp:
                answers.append((resp.status, _answer(await resp.read())))
    return answers


async def send_requests(
    url: str, source: SourceSettings, requests: Sequence[DemoRequest], delay: float = 0.0
) -> list[tuple[int, dict[str, Any]]]:
    """Post each request signed (its id, for a stream, is the stream's); return (status,
    answer) per request."""
    answers = []
    timeout = aiohttp.ClientTimeout(total=30)
    target = f"{url.rstrip('/')}/v1/ingest/{source.id}"
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for index, request in enumerate(requests):
            if index and delay:
                await asyncio.sleep(delay)
            headers = signed_headers(
                source, request.body, msg_id=request.stream_id, content_type=request.content_type
            )
            params = {"session_id": request.session_id} if request.session_id else None
            async with http.post(target, data=request.body, headers=headers, params=params) as resp:
                answers.append((resp.status, _answer(await resp.read())))
    return answers


def _answer(body: bytes) -> dict[str, Any]:
    """The relay's JSON answer, or the text of whatever else answered."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {"text": body.decode(errors="replace")[:200]}
    return answer if isinstance(answer, dict) else {"answer": answer}
