"""The Redis hub: changes committed on any relay instance reach every instance.

Each instance publishes its commits on one Redis pub/sub channel and listens on it.
Everything that reaches an instance, its own commits at once and the others' through
Redis, goes through one queue to a `Sequencer`, which hands it to the instance's
in-process hub in change id order, each change once, filling gaps from the change log.

Redis holds nothing durable. When it is unreachable, publishing drops the commit (and
counts and logs it, rate-limited) without ever blocking ingest; the listener reconnects
with backoff and then catches up from the log; and a periodic catch-up from the log
keeps streams and waiters moving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from relay import hub_wire
from relay.changes import Commit, StoredChange
from relay.config import HubSettings
from relay.hub import InProcessHub, LastChangeId, ReadChanges, SessionWatch, Subscription
from relay.hub_order import Sequencer

log = structlog.get_logger("relay.hub")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger commits go as ids only
PUBLISH_BATCH = 256
CONNECT_TIMEOUT_SECONDS = 2.0
LOG_EVERY_SECONDS = 10.0
PING_EVERY_SECONDS = 5.0  # of silence on the subscription
_FAILURES = (RedisError, OSError, TimeoutError)


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before reconnect attempt `attempt` (0, 1, ...): doubling from 0.1 s to 5 s,
    with up to a fifth of jitter."""
    return min(5.0, 0.1 * 2.0**attempt) * (1 + 0.2 * rand())


class Throttle:
    """Lets a repeated warning through at most once per interval, counting the rest."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to stay quiet; else how many warnings were held back since the last one."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


@dataclass(slots=True)
class HubStats:
    published: int = 0  # commits sent to Redis
    dropped: int = 0  # commits not sent (Redis unreachable, or the queue full)
    received: int = 0  # commits from other instances
    bad_messages: int = 0
    connects: int = 0  # times the listener subscribed (the first time, and reconnects)
    connected: bool = False  # the listener is subscribed
    pings: int = 0  # asked whether the connection is alive after a silence


@dataclass(frozen=True, slots=True)
class _CatchUp:
    through: int | None = None


_FILL = _CatchUp(-1)  # the held commits are due: fill their gaps from the log


class RedisHub:
    def __init__(
        self,
        settings: HubSettings,
        read_changes: ReadChanges,
        last_change_id: LastChangeId,
        ping_every: float = PING_EVERY_SECONDS,
    ) -> None:
        self._settings = settings
        self._ping_every = ping_every
        self._last_change_id = last_change_id
        self._channel = f"{settings.prefix}:changes"
        self._origin = uuid.uuid4().hex
        self._own = hub_wire.sent_by(self._origin)
        self._local = InProcessHub()
        self._sequencer = Sequencer(self._local.publish, read_changes, settings.gap_wait_seconds)
        self._inbox: asyncio.Queue[Commit | _CatchUp] = asyncio.Queue()
        self._outbox: asyncio.Queue[Commit] = asyncio.Queue(settings.publish_queue)
        self._catching_up = False
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self._publish_warning = Throttle(LOG_EVERY_SECONDS)
        self._listen_warning = Throttle(LOG_EVERY_SECONDS)
        self.stats = HubStats()

    def counters(self) -> dict[str, int]:
        return {name: int(value) for name, value in asdict(self.stats).items()}

    @property
    def last_delivered(self) -> int:
        return self._sequencer.last

    async def start(self) -> None:
        self._sequencer.last = await self._last_change_id()
        self._redis = aioredis.Redis.from_url(
            self._settings.url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=CONNECT_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),  # failures surface here, to be caught up on
            # RESP2: with RESP3 every message reaches a push handler that formats it for a
            # debug log (a third more CPU per message, which each instance pays for every
            # commit of every instance).
            protocol=2,
        )
        self._tasks = [
            asyncio.create_task(self._run_deliveries(), name="relay-hub-deliver"),
            asyncio.create_task(self._run_publisher(), name="relay-hub-publish"),
            asyncio.create_task(self._run_listener(), name="relay-hub-listen"),
            asyncio.create_task(self._run_catch_up_timer(), name="relay-hub-catch-up"),
        ]

    async def stop(self) -> None:
        # The Redis client may swallow a cancellation arriving mid-command (the task then
        # goes on), so each task is cancelled until it has ended.
        for task in self._tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def publish(self, commit: Commit) -> None:
        self._inbox.put_nowait(commit)
        try:
            self._outbox.put_nowait(commit)
        except asyncio.QueueFull:
            self._dropped(1, "the publish queue is full")

    # -- the local side: the in-process hub's interface --------------------------------

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        self._local.add_commit_listener(listener)

    def subscribe(
        self,
        accepts: Callable[[StoredChange], bool],
        limit: int,
        on_overflow: Callable[[], None],
    ) -> AbstractContextManager[Subscription]:
        return self._local.subscribe(accepts, limit, on_overflow)

    def watch_session(self, session_id: str) -> AbstractContextManager[SessionWatch]:
        return self._local.watch_session(session_id)

    def close(self) -> None:
        self._local.close()

    @property
    def subscribers(self) -> int:
        return self._local.subscribers

    @property
    def watching(self) -> int:
        return self._local.watching

    # -- the tasks ---------------------------------------------------------------------

    async def _run_deliveries(self) -> None:
        while True:
            try:
                item = await asyncio.wait_for(self._inbox.get(), self._sequencer.fill_due_in())
            except TimeoutError:
                item = _FILL
            try:
                if item is _FILL:
                    await self._sequencer.fill()
                elif isinstance(item, _CatchUp):
                    self._catching_up = False
                    await self._sequencer.catch_up(item.through)
                else:
                    await self._sequencer.offer(item)
            except Exception:
                # The log could not be read: what was not delivered is delivered by the
                # next catch-up, in order.
                log.exception("hub.delivery_failed", last=self._sequencer.last)

    def _catch_up(self) -> None:
        if not self._catching_up:
            self._catching_up = True
            self._inbox.put_nowait(_CatchUp())

    async def _run_catch_up_timer(self) -> None:
        while True:
            await asyncio.sleep(self._settings.catch_up_interval_seconds)
            self._catch_up()

    async def _run_publisher(self) -> None:
        assert self._redis is not None
        attempt = 0
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < PUBLISH_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for commit in batch:
                        pipe.publish(self._channel, self._encode(commit))
                    await pipe.execute()
            except _FAILURES as exc:
                self._dropped(len(batch) + self._drain_outbox(), f"Redis: {exc}")
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            self.stats.published += len(batch)
            attempt = 0

    def _encode(self, commit: Commit) -> bytes:
        return hub_wire.encode(self._origin, commit, MAX_MESSAGE_BYTES)

    def _drain_outbox(self) -> int:
        count = 0
        while not self._outbox.empty():
            self._outbox.get_nowait()
            count += 1
        return count

    def _dropped(self, count: int, reason: str) -> None:
        self.stats.dropped += count
        suppressed = self._publish_warning.allow()
        if suppressed is not None:
            log.warning(
                "hub.publish_failed",
                reason=reason,
                dropped=self.stats.dropped,
                warnings_suppressed=suppressed,
            )

    async def _run_listener(self) -> None:
        attempt = 0
        while True:
            connects = self.stats.connects
            try:
                await self._listen()
            except _FAILURES as exc:
                if self._listen_warning.allow() is not None:
                    log.warning("hub.listen_failed", error=str(exc), attempt=attempt)
            self.stats.connected = False
            attempt = 0 if self.stats.connects != connects else attempt + 1
            await asyncio.sleep(backoff(attempt))

    async def _listen(self) -> None:
        assert self._redis is not None
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._channel)
            self.stats.connected = True
            self.stats.connects += 1
            if self.stats.connects > 1:
                log.info("hub.reconnected", catching_up_after=self._sequencer.last)
            self._catch_up()  # what was published while nobody listened is in the log
            heard = time.monotonic()  # when Redis last said anything (a message or a pong)
            while True:
                wait = min(1.0, self._ping_every)
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None:
                    heard = time.monotonic()
                    if message["type"] == "message":
                        self._received(message["data"])
                    continue
                # A connection can die without a word (a partition): ask, and give up on
                # it when Redis has said nothing for three pings.
                silent = time.monotonic() - heard
                if silent > 3 * self._ping_every:
                    raise RedisConnectionError(f"no answer from Redis for {silent:.1f} s")
                if silent > self._ping_every:
                    await pubsub.ping()
                    self.stats.pings += 1

    def _received(self, data: bytes) -> None:
        if data.startswith(self._own):
            return  # delivered here when it was published
        try:
            message = hub_wire.decode(data)
        except hub_wire.BadMessage as exc:
            self.stats.bad_messages += 1
            log.warning("hub.bad_message", error=str(exc), size=len(data))
            return
        if message.origin == self._origin:
            return  # delivered here when it was published
        self.stats.received += 1
        if message.commit.changes or message.commit.sessions:
            self._inbox.put_nowait(message.commit)
        if message.through is not None:
            self._inbox.put_nowait(_CatchUp(message.through))
