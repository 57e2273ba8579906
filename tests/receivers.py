"""A real webhook receiver on loopback that verifies what it gets and answers as told."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import standardwebhooks
from aiohttp import web

from tests.conftest import Relay

# (the receipt, how many times this webhook-id came before) -> the answer
Answer = Callable[["Receipt", int], Awaitable[web.StreamResponse] | web.StreamResponse]


@dataclass
class Receipt:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived
    verified: bool
    status: int = 0  # what the receiver answered

    @property
    def payload(self) -> Any:
        return orjson.loads(self.body)

    @property
    def message_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def change_id(self) -> int:
        change_id: int = self.payload["data"]["id"]
        return change_id


def ok(receipt: Receipt, seen: int) -> web.Response:
    return web.Response(text="thanks")


@dataclass
class Receiver:
    url: str
    secrets: dict[str, str] = field(default_factory=dict)  # path -> whsec_ secret
    answers: dict[str, Answer] = field(default_factory=dict)  # path -> how to answer
    receipts: list[Receipt] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)

    def endpoint(self, path: str, answer: Answer = ok) -> str:
        self.answers[path] = answer
        return self.url + path

    def at(self, path: str, delivered: bool = True) -> list[Receipt]:
        """What reached `path` (only what was answered 2xx when `delivered`)."""
        return [
            r for r in self.receipts if r.path == path and (not delivered or 200 <= r.status < 300)
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        secret = self.secrets.get(request.path)
        verified = False
        if secret is not None:
            try:
                standardwebhooks.Webhook(secret).verify(body, headers)
                verified = True
            except standardwebhooks.webhooks.WebhookVerificationError:
                verified = False
        receipt = Receipt(request.path, headers, body, time.time(), verified)
        key = f"{request.path} {headers.get('webhook-id')}"
        seen = self.seen[key]
        self.seen[key] += 1
        self.receipts.append(receipt)
        answer = self.answers.get(request.path, ok)(receipt, seen)
        response = await answer if asyncio.iscoroutine(answer) else answer
        assert isinstance(response, web.StreamResponse)
        receipt.status = response.status
        return response


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    got = Receiver("")
    app.router.add_route("*", "/{tail:.*}", got.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    got.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield got
    finally:
        await runner.cleanup()


async def eventually(check: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until `check()` holds, polling; fail after `within` seconds."""

    async def holds() -> bool:
        return check()

    await until(holds, within)


async def until(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Wait until `await check()` holds, polling; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.02)


async def subscribe(relay: Relay, got: Receiver, path: str, **fields: Any) -> dict[str, Any]:
    """Create a subscription to `path` through the API; the receiver learns its secret."""
    resp = await relay.client.post(
        "/v1/subscriptions", json={"url": got.url + path, **fields}, headers=relay.auth
    )
    assert resp.status == 201, await resp.text()
    created: dict[str, Any] = await resp.json()
    got.secrets[path] = created["secret"]
    return created


async def api(relay: Relay, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    resp = await relay.client.request(method, path, headers=relay.auth, **kwargs)
    assert resp.status == status, await resp.text()
    return None if resp.status == 204 else await resp.json()


FAST_DELIVERY = {
    "allow_private_networks": True,
    "retry_schedule_seconds": [0.05, 0.1, 0.2],
    "poll_interval_seconds": 0.2,
    "timeout_seconds": 2,
}


async def witness(relay: Relay, got: Receiver) -> Callable[[int], Awaitable[None]]:
    """A subscription taking every change, made now; the returned wait ends once it has
    received `count` changes: proof that the dispatcher has gone past those changes (a
    positive marker to wait for before checking that something else was not sent)."""
    await subscribe(relay, got, "/witness")

    async def received(count: int) -> None:
        await eventually(lambda: len(got.at("/witness")) >= count)

    return received
