"""A webhook receiver that verifies relay's deliveries with the `standardwebhooks` library.

    pip install aiohttp standardwebhooks
    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py [PORT]

Prints one line per verified change; answers 401 to anything whose signature fails.
"""

from __future__ import annotations

import json
import os
import sys

import standardwebhooks
from aiohttp import web


def make_app(secret: str) -> web.Application:
    verifier = standardwebhooks.Webhook(secret)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            message = verifier.verify(body, dict(request.headers))
        except standardwebhooks.WebhookVerificationError as exc:
            print(f"REJECTED {request.headers.get('webhook-id')}: {exc}", flush=True)
            return web.Response(status=401)
        change = message["data"]
        session = change.get("session") or {}
        print(
            f"verified {request.headers['webhook-id']}: {message['type']:<22}"
            f" session={change.get('session_id')} readiness={session.get('readiness')}"
            f" turn={change.get('turn_id')}",
            flush=True,
        )
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(json.dumps({"listening": f"http://127.0.0.1:{port}/hook"}), flush=True)
    web.run_app(make_app(os.environ["WEBHOOK_SECRET"]), host="127.0.0.1", port=port, print=None)
