"""The README's example receiver verifies relay's deliveries and refuses forged ones."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from examples.webhook_receiver import make_app
from relay.webhooks.secrets import new_webhook_secret
from relay.webhooks.signing import webhook_request


async def test_receiver_accepts_signed_and_refuses_forged_deliveries(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    """A delivery signed by relay gets 204; the same body with another secret gets 401."""
    secret = new_webhook_secret()
    client = await aiohttp_client(make_app(secret))
    change = orjson.dumps(
        {"id": 7, "type": "session.ready", "session_id": "chat_1", "turn_id": None}
    )
    body, headers = webhook_request("msg_7", "session.ready", change, [secret], time.time())
    ok = await client.post("/hook", data=body, headers=headers)
    assert ok.status == 204
    body, headers = webhook_request(
        "msg_7", "session.ready", change, [new_webhook_secret()], time.time()
    )
    forged = await client.post("/hook", data=body, headers=headers)
    assert forged.status == 401
