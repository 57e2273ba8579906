"""Follow: relay reads a session's long-lived stream (`follow_url`) and stores its frames.

The store is the only authority on a follow: its position (the last SSE id stored, sent
as `Last-Event-ID` on every connection), its state and which instance runs it. Each
instance claims free follows with a lease in the store and renews it while it runs them
(`claim_follows`, every `follow_poll_seconds`); one that dies stops renewing, and after
`follow_lease_seconds` another instance takes its follows over from their positions.
Every write of a follow names its owner, so an instance that lost a lease stops.

The position moves only after a batch's events are committed: a crash in between sends
those frames again, and the store keeps each event once. While the upstream fails, the
follow waits longer each time (`backoff_delay`, counted in `attempts`); it stops after
`follow_idle_seconds` without a frame (`idle`), or when the upstream says the session is
gone (404 or 410: `deleted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from relay.changes import Commit
from relay.config import ConnectorSettings, SourceSettings
from relay.connectors.backoff import backoff_delay
from relay.connectors.frames import FrameMapper, store_events
from relay.connectors.sse import SSEParser
from relay.connectors.stats import ConnectorStats
from relay.ingest import Source
from relay.logs import RepeatedWarnings
from relay.store import Follow, Store
from relay.timefmt import format_time, utcnow

log = structlog.get_logger("relay.follow")

SSE = "text/event-stream"
_GONE = (404, 410)


@dataclass(frozen=True, slots=True)
class Followed:
    """A source with a `follow_url`."""

    source: Source
    settings: SourceSettings

    def url(self, session_id: str) -> str:
        assert self.settings.follow_url is not None
        return self.settings.follow_url.replace("{session_id}", quote(session_id, safe=""))


class UpstreamRefused(Exception):
    """The upstream answered, but not with a stream."""


class LeaseLost(Exception):
    """Another instance holds the follow now."""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Follower:
    """Runs the follows this instance holds the lease of."""

    def __init__(
        self,
        followed: Mapping[str, Followed],
        store: Store,
        stats: ConnectorStats,
        client: Callable[[], aiohttp.ClientSession],
        settings: ConnectorSettings,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.followed = followed
        self.owner = instance_id()
        self.store = store
        self.stats = stats
        self.client = client
        self.settings = settings
        self.clock = clock
        self.rand = rand
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._warnings = RepeatedWarnings()
        self._starting: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Look for follows to run now (one was just started)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self._claim()
            except Exception as exc:
                self._warn("follow.claim_failed", str(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.follow_poll_seconds)

    async def stop(self) -> None:
        tasks = [*self._running.values(), *self._starting]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._running.clear()
        with contextlib.suppress(Exception):
            await self.store.release_follows(self.owner)

    async def _claim(self) -> None:
        now = self.clock()
        until = now + self.settings.follow_lease_seconds
        held = await self.store.claim_follows(self.owner, now, until, 1000)
        keys = set()
        for follow in held:
            key = (follow.source, follow.session_id)
            followed = self.followed.get(follow.source)
            if followed is None:
                continue
            keys.add(key)
            task = self._running.get(key)
            if task is None or task.done():
                self._running[key] = asyncio.create_task(
                    self._follow(followed, follow), name=f"relay-follow-{follow.session_id}"
                )
        for key in [k for k in self._running if k not in keys]:
            self._running.pop(key).cancel()  # the lease went to another instance
        self.stats.open["follow"] = sum(not t.done() for t in self._running.values())

    def on_commit(self, commit: Commit) -> None:
        """A store commit listener: follow the new sessions of `follow_auto` sources."""
        for change in commit.changes:
            if change.type != "session.created":
                continue
            source = orjson.loads(change.body).get("cause", {}).get("source")
            followed = self.followed.get(source) if isinstance(source, str) else None
            if followed is not None and followed.settings.follow_auto:
                task = asyncio.create_task(self._start(source, change.session_id))
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)

    async def _start(self, source: str, session_id: str) -> None:
        try:
            await self.store.start_follow(source, session_id, _now())
        except Exception as exc:
            self._warn("follow.start_failed", str(exc))
            return
        self.wake()

    async def _follow(self, followed: Followed, follow: Follow) -> None:
        run = _Run(self, followed, follow)
        try:
            await run.loop()
        except LeaseLost:
            log.info("follow.lease_lost", source=follow.source, session=follow.session_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("follow.failed", source=follow.source, session=follow.session_id)

    def _warn(self, event: str, error: str) -> None:
        held_back = self._warnings.admit(event)
        if held_back is not None:
            log.warning(event, error=error, repeats_not_logged=held_back)


class _Run:
    """One follow on this instance, from its stored position to its stop."""

    def __init__(self, follower: Follower, followed: Followed, follow: Follow) -> None:
        self.f = follower
        self.followed = followed
        self.source = followed.source.id
        self.session = follow.session_id
        self.position = follow.position
        self.attempts = follow.attempts
        self.reconnects = follow.reconnects
        self.connected = False
        self.last_frame = time.monotonic()

    async def loop(self) -> None:
        settings = self.followed.settings
        while True:
            if self._idle() <= 0:
                await self._save(state="idle")
                return
            try:
                if await self._connect():
                    return
            except (aiohttp.ClientError, UpstreamRefused, TimeoutError, OSError) as exc:
                self.f.stats.add("upstream_errors", "follow", self.source)
                await self._failed(repr(exc) if not isinstance(exc, UpstreamRefused) else str(exc))
            except LeaseLost:
                raise
            except Exception as exc:  # the store could not take the frames
                self.f.stats.add("store_failures", "follow", self.source)
                await self._failed(f"store: {exc}")
            else:
                continue  # the upstream ended the stream: connect again at once
            delay = backoff_delay(
                self.attempts,
                settings.follow_backoff_seconds,
                settings.follow_backoff_max_seconds,
                self.f.rand(),
            )
            await asyncio.sleep(min(delay, max(self._idle(), 0.0)))

    def _idle(self) -> float:
        """Seconds left before the follow is idle."""
        return self.followed.settings.follow_idle_seconds - (time.monotonic() - self.last_frame)

    async def _failed(self, error: str) -> None:
        self.attempts += 1
        await self._save(state="backoff", attempts=self.attempts, last_error=error[:500])

    async def _connect(self) -> bool:
        """Read the stream until it ends (False) or the follow stops (True)."""
        headers = {**dict(self.followed.settings.follow_headers), "Accept": SSE}
        if self.position is not None:
            headers["Last-Event-ID"] = self.position
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.f.settings.upstream_connect_timeout_seconds
        )
        url = self.followed.url(self.session)
        async with self.f.client().get(url, headers=headers, timeout=timeout) as resp:
            if resp.status in _GONE:
                await self._save(state="deleted", last_error=f"HTTP {resp.status}")
                return True
            if resp.status >= 300 or resp.content_type != SSE:
                raise UpstreamRefused(f"HTTP {resp.status} {resp.content_type}")
            if self.connected:
                self.reconnects += 1
                self.f.stats.add("reconnects", "follow", self.source)
            self.connected = True
            self.attempts = 0
            await self._save(
                state="following", attempts=0, last_error=None, reconnects=self.reconnects
            )
            return await self._read(resp)

    async def _read(self, resp: aiohttp.ClientResponse) -> bool:
        stats = self.f.stats
        parser = SSEParser(last_id=self.position)
        provider = self.followed.source.provider
        mapper = FrameMapper(provider, self.source, f"follow:{self.session}", self.session)
        while True:
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), max(self._idle(), 0.0))
            except TimeoutError:
                await self._save(state="idle")
                return True
            if not chunk:
                return False
            stats.add("bytes", "follow", self.source, len(chunk))
            frames = parser.feed(chunk)
            if not frames:
                continue
            stats.add("frames", "follow", self.source, len(frames))
            self.last_frame = time.monotonic()
            received_at = datetime.fromtimestamp(self.f.clock(), UTC)
            batch = [mapper.frame(f.data, f.name, f.id) for f in frames]
            events = mapper.events([f for f in batch if f is not None], received_at)
            await store_events(self.f.store, events, received_at)
            if frames[-1].last_id is not None and frames[-1].last_id != self.position:
                self.position = frames[-1].last_id
                await self._save(position=self.position)

    async def _save(self, **changes: Any) -> None:
        saved = await self.f.store.update_follow(
            self.f.owner, self.source, self.session, changes, _now()
        )
        if not saved:
            raise LeaseLost()


def _now() -> str:
    return format_time(utcnow())
