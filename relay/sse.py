"""Server-Sent Events: `GET /v1/stream` and `GET /v1/sessions/{id}/stream`.

A stream catches up the way EventStoreDB's catch-up subscriptions do: it subscribes to
the hub, then reads the change log from the client's last event id page by page up to
its head, and only then goes live with what the hub buffered meanwhile, dropping live
changes it has already sent, so the replay and the live part meet with no gap and no
repeat. If the buffer overflows while the stream is still reading the log (ingest runs
ahead of the replay), the stream is not cut off: it drops that subscription, takes a
new one and keeps reading the log from where it got to. Frames are encoded once per
change and shared by every subscriber. A live subscriber that does not keep up overflows
its bounded buffer and is disconnected; it resumes with `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from relay import auth
from relay.api_models import StreamHeaders, StreamQuery
from relay.appkeys import HUB, SETTINGS, STORE, STREAM_KEYS
from relay.changes import StoredChange, as_chunk, excluded_types, glob_pattern
from relay.errors import ApiError
from relay.hub import Subscription
from relay.routes import Reply, Route, parse_headers, parse_query
from relay.stream_keys import end_revoked

log = structlog.get_logger("relay.sse")

REPLAY_PAGE = 500
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


class StreamFilter:
    """Which changes a stream wants: session ids and types, as exact names or globs."""

    def __init__(
        self, sessions: tuple[str, ...], types: tuple[str, ...], session: str | None = None
    ) -> None:
        self._session = session
        self._sessions: re.Pattern[str] | None = glob_pattern(sessions) if sessions else None
        self._types = glob_pattern(types)
        self.excluded = excluded_types(types)  # what the store can leave out
        exact = len(sessions) == 1 and not any(c in sessions[0] for c in "*?")
        # The one session the stream follows, if it names one: the store reads its changes only.
        self.session = session if session is not None else sessions[0] if exact else None
        # Exact type names, which the store reads through an index; () for globs.
        self.types = types if types and not any(c in t for t in types for c in "*?") else ()

    def __call__(self, change: StoredChange) -> bool:
        if self._session is not None and change.session_id != self._session:
            return False
        if self._sessions is not None and not self._sessions.fullmatch(change.session_id):
            return False
        return self._types.fullmatch(change.type) is not None


async def stream_changes(request: web.Request) -> web.StreamResponse:
    query = parse_query(request, StreamQuery)
    resume = parse_headers(request, StreamHeaders).last_event_id
    last_id = query.last_event_id if resume is None else resume
    session_id = request.match_info.get("session_id")
    if session_id and await request.app[STORE].get_session(session_id) is None:
        raise ApiError(404, "NOT_FOUND", f"no session {session_id!r}")
    accepts = StreamFilter(query.session_id, query.type, session_id)
    settings = request.app[SETTINGS].sse
    response = web.StreamResponse(headers=HEADERS)

    def disconnect() -> None:
        # abort(), not close(): close() would first wait to flush what the slow client
        # is not reading, which is exactly what must not be waited for.
        if request.transport is not None:
            request.transport.abort()

    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    # The client may go away (or be cut off for not reading): nothing to answer then.
    key = request.get(auth.API_KEY)
    live = False
    watchdog = _Watchdog(settings.heartbeat_seconds, disconnect)

    def overflowed() -> None:
        if live:
            disconnect()
        else:  # while catching up, the log is read again instead, if the client reads
            watchdog.start()

    with contextlib.suppress(ConnectionResetError), watchdog:
        await response.prepare(request)
        # No blank line after `retry:`: it joins the first event rather than be a block of
        # its own, which client libraries would hand over as an event without data.
        await response.write(b"retry: %d\n" % settings.retry_ms)
        after: int | None = None
        while True:
            with (
                request.app[HUB].subscribe(
                    accepts, settings.buffer_changes, overflowed
                ) as subscription,
                request.app[STREAM_KEYS].track(key.id, subscription)
                if key
                else contextlib.nullcontext(),
            ):
                if after is None:
                    after = await _start(request, response, last_id)
                after = await _replay(request, response, accepts, after, watchdog)
                if subscription.overflowed and not subscription.closed:
                    continue  # fell behind while reading the log: read on from the store
                live = True
                watchdog.stop()
                await _serve(request, response, subscription, after)
                return response
    return response


async def revocation_watch(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: end the streams of revoked API keys, checking every
    `sse.key_check_seconds` while any stream is open."""
    streams = app[STREAM_KEYS]

    async def run() -> None:
        while True:
            await asyncio.sleep(app[SETTINGS].sse.key_check_seconds)
            try:
                ended = await end_revoked(app[STORE], streams)
            except Exception:
                log.exception("sse.key_check_failed")
                continue
            if ended:
                log.info("sse.revoked_key_streams_ended", streams=ended)

    task = asyncio.create_task(run(), name="relay-stream-keys")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _serve(
    request: web.Request, response: web.StreamResponse, subscription: Subscription, sent: int
) -> None:
    """The live part: changes after `sent` as the hub publishes them."""
    settings = request.app[SETTINGS].sse
    # The position the live part starts from, as a control event with an id, so a client
    # that reconnects before its first change still resumes here (an id-only frame would
    # do that too, but client libraries hand it over as an empty event).
    await response.write(b'id: %d\nevent: stream.position\ndata: {"id": %d}\n\n' % (sent, sent))

    # From here on changes are written to the socket as they are published, each one a
    # frame (and chunk) encoded once for all subscribers: no task wakes per change.
    transport = request.transport
    assert transport is not None
    chunked = response.headers.get("Transfer-Encoding") == "chunked"
    # A comment line alone, with no blank line: after an id, some client libraries hand a
    # blank line over as an event without data.
    heartbeat = as_chunk(b": heartbeat\n") if chunked else b": heartbeat\n"
    last = [sent]

    def write(change: StoredChange) -> None:
        if transport.is_closing():
            subscription.overflow()  # the client is gone: end the stream
            return
        if change.id <= last[0]:
            return
        last[0] = change.id
        transport.write(change.chunk if chunked else change.frame)
        if transport.get_write_buffer_size() > settings.buffer_bytes:
            subscription.overflow()  # it is not reading: cut it off, it resumes later

    for change in subscription.deliver_to(write):
        write(change)
    while not await subscription.ended(settings.heartbeat_seconds):
        if transport.is_closing():
            break  # the client is gone (without handler cancellation nothing else says so)
        transport.write(heartbeat)
    if subscription.closed and not subscription.overflowed:
        await response.write_eof()


async def _start(request: web.Request, response: web.StreamResponse, last_id: int | None) -> int:
    """The id the stream starts after, once subscribed; says so if it is not `last_id`."""
    store = request.app[STORE]
    newest = await store.last_change_id()
    if last_id is None:
        return newest
    if last_id > newest:
        # Ahead of the log (a client from before a restore, or a made-up id): waiting for
        # ids above it would drop every change until then. Start over from the newest.
        await response.write(b'event: stream.reset\ndata: {"newest_id": %d}\n\n' % newest)
        return newest
    oldest = await store.list_changes(0, 1)
    if oldest and last_id < oldest[0].id - 1:
        reset = b'event: stream.reset\ndata: {"oldest_id": %d}\n\n' % oldest[0].id
        await response.write(reset)
    return last_id


class _Watchdog:
    """Ends a stream whose client takes nothing while it catches up behind a live buffer
    that overflowed: once started, it looks every `seconds` whether a page of the replay
    is still waiting for the client since the last look."""

    def __init__(self, seconds: float, disconnect: Callable[[], None]) -> None:
        self._seconds = seconds
        self._disconnect = disconnect
        self._timer: asyncio.TimerHandle | None = None
        self._seen = -1
        self.pages = 0  # pages the client has taken
        self.writing = False  # a page is waiting for the client

    def start(self) -> None:
        if self._timer is None:
            self._seen = self.pages
            self._timer = asyncio.get_running_loop().call_later(self._seconds, self._look)

    def _look(self) -> None:
        if self.writing and self.pages == self._seen:
            self._timer = None
            self._disconnect()
            return
        self._seen = self.pages
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> _Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _replay(
    request: web.Request,
    response: web.StreamResponse,
    accepts: StreamFilter,
    after: int,
    watchdog: _Watchdog,
) -> int:
    """Send the stored changes after `after` up to the log's head; return the last id read."""
    store = request.app[STORE]
    only = accepts.session
    while True:
        if only is None:
            page = await store.list_changes(
                after, REPLAY_PAGE, accepts.types, exclude=accepts.excluded
            )
        else:
            page = await store.list_session_changes(only, after, REPLAY_PAGE, accepts.excluded)
        frames = [change.frame for change in page if accepts(change)]
        if frames:
            watchdog.writing = True
            await response.write(b"".join(frames))
            watchdog.writing = False
            watchdog.pages += 1
        if page:
            after = page[-1].id
        if len(page) < REPLAY_PAGE:
            return after
        await asyncio.sleep(0)


_STREAM = Reply(
    "A stream of Server-Sent Events: `id: <change id>`, `event: <change type>`, "
    "`data: <the change as one line of JSON>` (see the `Change` schema); it does not end. "
    "Control events are named `stream.*` and carry JSON data too: `stream.position` "
    '(`{"id": N}`, with `id: N`) where the replay ends and the live part begins, '
    '`stream.reset` (`{"oldest_id": N}` or `{"newest_id": N}`) before a replay that cannot '
    "continue exactly from the id the client gave.",
    content_types=("text/event-stream",),
)


def routes() -> list[Route]:
    """The two change streams (scope `agent:read`)."""

    def stream(path: str, summary: str, errors: dict[int, tuple[str, ...]]) -> Route:
        return Route(
            "GET",
            path,
            stream_changes,
            summary,
            tag="stream",
            scope=auth.READ,
            query=StreamQuery,
            headers=StreamHeaders,
            replies={200: _STREAM},
            errors=errors,
            head=False,
            query_token=True,
            description="Resume with `Last-Event-ID` (or `?last_event_id=`): every matching "
            "change after it, exactly once, in id order, then live. If that id is older than "
            "the retained history, `event: stream.reset` comes first with the oldest id; if it "
            "is newer than the newest change, `stream.reset` with the newest id, and the stream "
            "goes on from there.",
        )

    return [
        stream("/v1/stream", "Follow the change log live", {}),
        stream(
            "/v1/sessions/{session_id}/stream",
            "Follow one session's changes live",
            {404: ("NOT_FOUND",)},
        ),
    ]
