"""How `relay serve` runs the app on its listener: handler options and client timeouts."""

from __future__ import annotations

from aiohttp import web

from relay.config import ServerSettings
from relay.http_server import Runner


def app_runner(app: web.Application, server: ServerSettings) -> web.AppRunner:
    """The runner for `app`, with its connections bounded in time.

    A connection is closed when it has sat `idle_timeout_seconds` without a request in
    progress: idle between requests, and also while a request's headers are still arriving
    (the timer is not extended by each byte), so a client trickling headers is cut off too.
    Errors aiohttp answers itself (unparseable requests) use the JSON envelope.
    """
    return Runner(
        app,
        access_log=None,
        handle_signals=False,
        # A client that goes away ends its handler at once (an SSE stream then leaves
        # the hub immediately, not at its next write).
        handler_cancellation=True,
        shutdown_timeout=server.shutdown_timeout_seconds,
        keepalive_timeout=server.idle_timeout_seconds,
    )
