"""The connectors on the app: the upstream HTTP client, the tap's routes, the follower."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web

from relay.appkeys import METRICS, SETTINGS, STORE
from relay.connectors import follow_api, tap
from relay.connectors.feed import FeedContext, finish_feeds
from relay.connectors.follow import Followed, Follower
from relay.connectors.paths import SESSION_PATHS
from relay.ingest import Source
from relay.logs import RepeatedWarnings
from relay.routes import Route

UPSTREAM_CLIENT = web.AppKey("upstream_client", aiohttp.ClientSession)
FOLLOWER = web.AppKey("follower", Follower)
_FEED_GRACE_SECONDS = 2.0


def setup_connectors(
    app: web.Application, sources: Mapping[str, Source], clock: Callable[[], float]
) -> list[Route]:
    """Wire the tap and the follower into `app` (after the store's lifetime); their routes."""
    settings, store, stats = app[SETTINGS], app[STORE], app[METRICS].connectors
    options = settings.connectors
    feeds = FeedContext(
        store,
        stats,
        RepeatedWarnings(),
        clock,
        options.tap_queue_frames,
        options.tap_batch_frames,
        options.tap_queue_bytes,
        options.tap_text_delay_seconds,
    )

    def client() -> aiohttp.ClientSession:
        return app[UPSTREAM_CLIENT]

    taps = {
        s.id: tap.Tapped(
            sources[s.id], s.upstream, s.tap_session_pattern or SESSION_PATHS.get(s.provider)
        )
        for s in settings.sources
        if s.upstream is not None
    }
    followed = {
        s.id: Followed(sources[s.id], s) for s in settings.sources if s.follow_url is not None
    }
    follower = Follower(followed, store, stats, client, options, clock) if followed else None
    if follower is not None:
        app[FOLLOWER] = follower
        if any(f.settings.follow_auto for f in followed.values()):
            store.add_commit_listener(follower.on_commit)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAM_CLIENT] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=options.upstream_connect_timeout_seconds
            ),
        )
        running = None
        if follower is not None:
            running = asyncio.create_task(follower.run(), name="relay-follower")
        yield
        if running is not None and follower is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await follower.stop()
        await finish_feeds(feeds.tasks, _FEED_GRACE_SECONDS)
        await app[UPSTREAM_CLIENT].close()

    app.cleanup_ctx.append(lifetime)
    context = tap.TapContext(taps, feeds, client, settings.server.max_body_bytes)
    return [*tap.routes(context), *follow_api.routes(store, follower, followed)]
