"""`/v1/tap/{source_id}/{path}`: a request passed to the source's upstream, and its answer
passed back unchanged (status, headers but hop-by-hop ones, each chunk as it arrives)
while its Server-Sent Events frames go, without waiting, through the source's provider
into the store.

Passing chunks on comes first: after writing a chunk the tap hands the stream's feed a
copy (decompressed, if the answer is) and reads the next; the feed reads the frames and
stores them later, when the process has nothing more urgent to do (see `feed` and
`lane`). Reading frames between chunks would delay every chunk of every stream behind
that work on a busy process.

The upstream is the operator's configuration and is used as configured; what the caller
controls (the path, the query, headers) cannot move the request off it (see `paths`).
The caller's own `Authorization` goes to that upstream and nowhere else. An upstream
that drops the stream is passed on as a drop: the caller's connection is closed without
the end of the body, and nothing is stored that the upstream did not send.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import structlog
from aiohttp import web

from relay.connectors.feed import FeedContext, TapFeed
from relay.connectors.frames import FrameMapper
from relay.connectors.paths import UnsafePath, forward_headers, session_from_path, upstream_url
from relay.errors import ApiError
from relay.events import Event, EventType
from relay.ingest import Source
from relay.routes import Reply, Route

log = structlog.get_logger("relay.tap")

SSE = "text/event-stream"
# Headers aiohttp's client would add on its own: the upstream gets the caller's, or none.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True, slots=True)
class Tapped:
    """A source with an upstream."""

    source: Source
    upstream: str
    session_pattern: str | None


@dataclass(frozen=True, slots=True)
class TapContext:
    taps: Mapping[str, Tapped]
    feeds: FeedContext
    client: Callable[[], aiohttp.ClientSession]
    max_body_bytes: int


async def tap(ctx: TapContext, request: web.Request) -> web.StreamResponse:
    source_id = request.match_info["source_id"]
    tapped = ctx.taps.get(source_id)
    if tapped is None:
        raise ApiError(404, "UNKNOWN_SOURCE", f"no source with id {source_id!r} has an upstream")
    raw_path, _, raw_query = request.raw_path.partition("?")
    prefix = f"/v1/tap/{source_id}/"
    if not raw_path.startswith(prefix):
        raise ApiError(400, "INVALID_PATH", "the path is not under /v1/tap/{source_id}/")
    path = raw_path[len(prefix) :]
    try:
        url = upstream_url(tapped.upstream, path, raw_query)
    except UnsafePath as exc:
        raise ApiError(400, "INVALID_PATH", str(exc)) from None
    body = await request.read()
    stats, source = ctx.feeds.stats, tapped.source
    try:
        upstream = await ctx.client().request(
            request.method,
            url,
            headers=forward_headers(request.headers.items(), request=True),
            data=body or None,
            allow_redirects=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.add("upstream_errors", "tap", source.id)
        log.warning("tap.upstream_unavailable", source=source.id, error=repr(exc))
        raise ApiError(502, "UPSTREAM_UNAVAILABLE", "the upstream did not answer") from None
    stats.open["tap"] += 1
    try:
        return await _relay(ctx, tapped, request, upstream, path)
    finally:
        stats.open["tap"] -= 1
        upstream.release()


async def _relay(
    ctx: TapContext,
    tapped: Tapped,
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    path: str,
) -> web.StreamResponse:
    source, stats = tapped.source, ctx.feeds.stats
    session = session_from_path(tapped.session_pattern, path) or request.query.get("session_id")
    mapper = FrameMapper(source.provider, source.id, "tap_" + secrets.token_hex(8), session)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
    for name, value in forward_headers(raw, request=False):
        response.headers.add(name, value)
    feed: TapFeed | None = None
    if upstream.status == 409:
        feed = TapFeed(ctx.feeds, mapper)
        feed.offer([conflict(mapper, upstream.headers, ctx.feeds.clock())])
        stats.add("conflicts", "tap", source.id)
    encoding = upstream.headers.get("Content-Encoding", "")
    decode = _decoder(encoding) if upstream.content_type == SSE else None  # frames: SSE only
    if decode is not None and feed is None:
        feed = TapFeed(ctx.feeds, mapper)
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionResetError:  # the caller went away
                return response
            stats.add("bytes", "tap", source.id, len(chunk))
            if decode is not None and feed is not None:
                feed.append(decode(chunk))
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, zlib.error) as exc:
        # A drop upstream is a drop here: the caller's body ends without its end.
        stats.add("upstream_errors", "tap", source.id)
        log.info("tap.upstream_dropped", source=source.id, error=repr(exc))
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        if feed is not None:
            feed.close()
    await response.write_eof()
    return response


def conflict(mapper: FrameMapper, headers: Mapping[str, str], now: float) -> Event:
    """An upstream 409: the request's turn (named after the request) was refused."""
    active = headers.get("X-Active-Turn-Id") or None
    retry_after = _seconds(headers.get("Retry-After"))
    data = {"status": 409, "active_turn_id": active, "retry_after": headers.get("Retry-After")}
    return Event(
        mapper.source,
        f"{mapper.stream_id}:conflict",
        EventType.TURN_CONFLICT,
        datetime.fromtimestamp(now, UTC),
        mapper.session_id,
        mapper.stream_id,
        data,
        active_turn_id=active,
        retry_after_seconds=retry_after,
        provider=mapper.provider.name,
    )


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None  # an HTTP date: passed on, not read
    return seconds if seconds is not None and 0 <= seconds <= 10**7 else None


def _decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """A copy of each chunk as the frames' bytes; None for an encoding not read."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk: chunk
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
        return zlib.decompressobj(wbits).decompress
    return None


def routes(ctx: TapContext) -> list[Route]:
    """The tap, for every method a chat API uses."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await tap(ctx, request)

    return [
        Route(
            method,
            "/v1/tap/{source_id}/{path:[\\s\\S]*}",
            handle,
            "Pass a request to the source's upstream and its answer back",
            tag="connectors",
            replies={200: Reply("The upstream's answer, unchanged.", content_types=("*/*",))},
            errors={
                400: ("INVALID_PATH",),
                404: ("UNKNOWN_SOURCE",),
                413: ("PAYLOAD_TOO_LARGE",),
                502: ("UPSTREAM_UNAVAILABLE",),
            },
            description="Answers with the upstream's status, headers (hop-by-hop ones aside) "
            "and body as they arrive; the Server-Sent Events frames of the answer are stored "
            "through the source's provider. The errors listed are the relay's own.",
        )
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    ]
