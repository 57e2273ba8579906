"""A bare aiohttp handler answering 200: the baseline the relay is measured against."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True}, status=200)


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/ingest/{source_id}", handle)
    app.router.add_get("/healthz", lambda request: handle(request))
    uvloop.run(_serve(app, int(sys.argv[1])))


async def _serve(app: web.Application, port: int) -> None:
    import asyncio

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
