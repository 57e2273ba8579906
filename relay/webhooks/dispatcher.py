"""The dispatcher: turns the change log into signed deliveries and attempts them.

Theory of operation. The durable change log is the source of truth; the hub only wakes
the dispatcher. Three loops share one event loop:

- the *enqueuer* turns changes after a durable cursor into delivery rows (one per
  matching subscription) and moves the cursor in the same transaction, so a crash
  anywhere loses nothing and duplicates nothing;
- the *scheduler* claims due deliveries for the subscriptions that may have work, up
  to each one's free in-flight slots, and starts one task per attempt;
- the *recorder* writes the attempts' results in batches (one transaction each), then
  frees the slots and wakes the scheduler.

A slow or dead endpoint only ever holds its own `max_in_flight` slots: no loop waits on
an HTTP request. Claimed rows carry a lease; after a restart every claimed row is due
again at once, so an attempt cut short by a crash is made again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import structlog

from relay.config import DeliverySettings
from relay.metrics import DeliveryStats
from relay.webhooks.headers import resolve_headers
from relay.webhooks.model import (
    Attempt,
    AttemptResult,
    ClaimedDelivery,
    DeliveryStatus,
    Ordering,
    Subscription,
)
from relay.webhooks.outbound import OutboundRequest, outbound_requests
from relay.webhooks.retry import Outcome, classify, parse_retry_after, settle
from relay.webhooks.secrets import SecretBox, SecretBoxError
from relay.webhooks.ssrf import BlockedDestination, GuardedResolver, check_url
from relay.webhooks.store import ClaimRequest, DeliveryStore

log = structlog.get_logger("relay.webhooks")

RESPONSE_PREFIX = 1024
ENQUEUE_BATCH = 2000
RECORD_BATCH = 2000
LEASE_MARGIN_SECONDS: float = DeliverySettings.model_fields["lease_margin_seconds"].default
_STATUS = {
    Outcome.DELIVERED: DeliveryStatus.DELIVERED,
    Outcome.RETRY: DeliveryStatus.RETRYING,
    Outcome.FAILED: DeliveryStatus.FAILED,
    Outcome.DISABLE: DeliveryStatus.FAILED,
}


@dataclass(slots=True)
class Endpoint:
    """A subscription as the dispatcher uses it: with its signing secrets in clear."""

    subscription: Subscription
    secret: str
    previous: tuple[tuple[str, float], ...]  # rotated-out secrets and when each stops signing
    enabled: bool
    failing_since: float | None
    routing_key: str | None = None  # PagerDuty, in clear

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        """The current secret and every previous one that has not ended."""
        return (self.secret, *(secret for secret, until in self.previous if until > now))


class Dispatcher:
    def __init__(
        self,
        store: DeliveryStore,
        box: SecretBox,
        settings: DeliverySettings,
        stats: DeliveryStats | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._box = box
        self._settings = settings
        self._stats = stats if stats is not None else DeliveryStats()
        self._clock = clock
        self._rand = rand
        self._endpoints: dict[str, Endpoint] = {}
        self._unreadable: set[str] = set()  # subscriptions whose secret does not decrypt
        self._in_flight: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._next_due: dict[str, float] = {}
        self._results: list[AttemptResult] = []
        # Subscriptions this dispatcher disabled (a 410, or failing too long), and when (the
        # newest), while that result is not written yet: the store will say so too, unless
        # `enabled` is set through the API after that moment (the later word wins).
        self._disabling: dict[str, float] = {}
        self._changes = asyncio.Event()
        self._work = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._stopping = False

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        released = await self._store.release_claims(self._clock())
        if released:
            log.info("webhooks.resumed_claimed", deliveries=released)
        await self.refresh()
        self._resolver = GuardedResolver(
            allow_private_networks=self._settings.allow_private_networks
        )
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=self._resolver, limit=0),
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds),
            auto_decompress=False,
        )
        self._loops = [
            asyncio.create_task(self._enqueue_loop(), name="relay-webhooks-enqueue"),
            asyncio.create_task(self._schedule_loop(), name="relay-webhooks-schedule"),
            asyncio.create_task(self._poll_loop(), name="relay-webhooks-poll"),
        ]
        self._recorder = asyncio.create_task(self._record_loop(), name="relay-webhooks-record")
        self.changes_committed()

    async def stop(self) -> None:
        """Stop claiming; let attempts in flight finish for a short grace, record what
        finished; what did not stays claimed and is attempted again after a restart."""
        try:
            for task in self._loops:
                task.cancel()
            if self._loops:
                await asyncio.wait(self._loops, timeout=5.0)
            if self._attempts:
                grace = self._settings.shutdown_grace_seconds
                await asyncio.wait(set(self._attempts), timeout=grace)
            for task in list(self._attempts):
                task.cancel()
            if self._attempts:
                await asyncio.wait(set(self._attempts), timeout=1.0)
            # Only now: the recorder ends once it has written every result there is.
            self._stopping = True
            self._results_ready.set()
            if self._recorder is not None:
                await asyncio.wait({self._recorder}, timeout=10.0)
                self._recorder.cancel()
                if self._results:
                    log.warning("webhooks.results_unrecorded", results=len(self._results))
        finally:
            if self._http is not None:
                await self._http.close()
            if self._resolver is not None:
                await self._resolver.close()

    def changes_committed(self) -> None:
        """Wake the enqueuer: the change log has grown."""
        self._changes.set()

    async def refresh(self) -> None:
        """Reload subscriptions and look for due deliveries of each (after a change through
        the API)."""
        await self._reload()
        self._dirty.update(self._endpoints)
        self._work.set()

    async def _reload(self) -> None:
        """Reload subscriptions; only new or changed ones are looked at for due deliveries
        (the others' due times are known from their last claim)."""
        subscriptions = await self._store.list_subscriptions()
        now = self._clock()
        binding = previous_secret_binding
        endpoints = {}
        unreadable = set()
        for s in subscriptions:
            try:
                secret = self._box.decrypt(s.secret, s.id)
            except SecretBoxError:
                # Left out (its deliveries wait) until its secret is rotated or the key fixed.
                unreadable.add(s.id)
                if s.id not in self._unreadable:
                    log.error("webhooks.secret_unreadable", subscription_id=s.id)
                continue
            previous = []
            for p in s.previous_secrets:
                if p.until > now:
                    with contextlib.suppress(SecretBoxError):  # one that cannot sign is left out
                        previous.append((self._box.decrypt(p.secret, binding(s.id)), p.until))
            routing_key = None
            if s.routing_key is not None:
                with contextlib.suppress(SecretBoxError):  # sent empty: the receiver says 400
                    routing_key = self._box.decrypt(s.routing_key, routing_key_binding(s.id))
            endpoint = Endpoint(s, secret, tuple(previous), s.enabled, s.failing_since, routing_key)
            known = self._endpoints.get(s.id)
            if known is not None and known.subscription.enabled_changed_at == s.enabled_changed_at:
                # The API has not set `enabled` since the last load; only attempts changed
                # these, and what they found here is at least as new as the store's row.
                endpoint.enabled, endpoint.failing_since = known.enabled, known.failing_since
            disabled_at = self._disabling.get(s.id)
            if disabled_at is not None and (s.enabled_changed_at or 0) < disabled_at:
                endpoint.enabled = False  # decided after the API's last word; written next
            endpoints[s.id] = endpoint
        self._unreadable = unreadable
        changed = {
            sid
            for sid, endpoint in endpoints.items()
            if sid not in self._endpoints
            or self._endpoints[sid].subscription != endpoint.subscription
            or (endpoint.enabled and not self._endpoints[sid].enabled)
        }
        self._endpoints = endpoints
        if changed:
            self._dirty.update(changed)
            self._work.set()

    # -- enqueue, schedule, record -----------------------------------------------------------

    async def _enqueue_loop(self) -> None:
        while True:
            await _wait(self._changes, self._settings.poll_interval_seconds)
            self._changes.clear()
            if not self._endpoints and not self._unreadable:
                # No subscription: the cursor stays where it is, so a subscription made
                # meanwhile (elsewhere too) still gets every change after its start.
                continue
            try:
                while True:
                    read, counts = await self._store.enqueue(ENQUEUE_BATCH, self._clock())
                    if counts:
                        self._dirty.update(counts)
                        self._work.set()
                    if read < ENQUEUE_BATCH:
                        break
            except Exception:
                log.exception("webhooks.enqueue_failed")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.poll_interval_seconds)
            try:
                await self._reload()
                if self._store.shared:
                    # Other instances queue deliveries, leave them behind when they die
                    # and schedule retries this one has not seen: look at them all.
                    self._dirty.update(self._endpoints)
                    self._work.set()
                self._stats.queue_depth = await self._store.queue_depth()
            except Exception:
                log.exception("webhooks.poll_failed")

    async def _schedule_loop(self) -> None:
        while True:
            await self._wait_for_work()
            try:
                await self._schedule()
            except Exception:
                log.exception("webhooks.claim_failed")
                await asyncio.sleep(self._settings.poll_interval_seconds)

    async def _wait_for_work(self) -> None:
        timeout = self._settings.poll_interval_seconds
        if self._next_due:
            timeout = min(timeout, max(min(self._next_due.values()) - self._clock(), 0.0))
        await _wait(self._work, timeout)
        self._work.clear()

    async def _schedule(self) -> None:
        now = self._clock()
        candidates = set(self._dirty)
        self._dirty.clear()
        for sid, due in list(self._next_due.items()):
            if due <= now:
                candidates.add(sid)
                del self._next_due[sid]
        requests = []
        for sid in sorted(candidates):
            endpoint = self._endpoints.get(sid)
            if endpoint is None or not endpoint.enabled:
                continue
            free = endpoint.subscription.max_in_flight - self._in_flight[sid]
            if free > 0:
                ordered = endpoint.subscription.ordering is Ordering.SESSION
                requests.append(ClaimRequest(sid, free, ordered))
        if not requests:
            return
        lease = self._settings.timeout_seconds + self._settings.lease_margin_seconds
        try:
            claimed, next_due = await self._store.claim(requests, self._clock, lease)
        except Exception:
            self._dirty.update(request.subscription_id for request in requests)
            raise
        now = self._clock()
        for sid, due in next_due.items():
            # Due now but not claimed: waiting for a slot or for the session's previous
            # delivery; the result that frees it marks the subscription dirty.
            if due > now:
                self._next_due[sid] = min(due, self._next_due.get(sid, due))
        for delivery in claimed:
            endpoint = self._endpoints.get(delivery.subscription_id)
            self._in_flight[delivery.subscription_id] += 1
            task = asyncio.create_task(self._attempt(endpoint, delivery))
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)

    async def _record_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            while self._results:
                batch = self._results[:RECORD_BATCH]
                del self._results[:RECORD_BATCH]
                try:
                    await self._store.record(batch)
                except Exception:
                    log.exception("webhooks.record_failed", results=len(batch))
                    self._results[:0] = batch
                    await asyncio.sleep(0.5)
                    continue
                for result in batch:
                    if result.frees_slot_on_record:
                        self._free_slot(result.subscription_id)
                    sid = result.subscription_id
                    if result.disable_reason and self._disabling.get(sid) == result.attempt.at:
                        del self._disabling[sid]  # the newest disable is written
                    self._dirty.add(result.subscription_id)
                self._work.set()
            if self._stopping:
                return

    def _free_slot(self, subscription_id: str) -> None:
        self._in_flight[subscription_id] -= 1
        if self._in_flight[subscription_id] <= 0:
            del self._in_flight[subscription_id]

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, endpoint: Endpoint | None, delivery: ClaimedDelivery) -> None:
        started = time.perf_counter()
        try:
            await self._try(endpoint, delivery, started)
        except Exception as exc:  # recorded and retried like a network error; frees the slot
            log.exception("webhooks.attempt_failed", delivery_id=delivery.id)
            latency_ms = (time.perf_counter() - started) * 1000
            error = f"{type(exc).__name__}: {exc}"
            self._finish(delivery, endpoint, None, latency_ms, None, error, False)

    async def _try(
        self, endpoint: Endpoint | None, delivery: ClaimedDelivery, started: float
    ) -> None:
        if endpoint is None:  # removed meanwhile: record the attempt as not made
            self._finish(delivery, None, None, 0.0, None, "the subscription was removed", True)
            return
        url = endpoint.subscription.url
        status: int | None = None
        response: str | None = None
        error: str | None = None
        retry_after: float | None = None
        refused = False
        reason = None if self._settings.allow_private_networks else check_url(url)
        if reason is not None:
            refused = True
            error = f"refused: {reason} (set delivery.allow_private_networks to allow it)"
        else:
            try:
                requests = self._requests(endpoint, delivery)
            except ValueError as exc:  # a header's variable is not set: retried
                error = str(exc)
            else:
                status, response, retry_after, error, refused = await self._post_all(
                    url, requests, delivery
                )
        latency_ms = (time.perf_counter() - started) * 1000
        self._finish(delivery, endpoint, status, latency_ms, response, error, refused, retry_after)

    def _requests(self, endpoint: Endpoint, delivery: ClaimedDelivery) -> list[OutboundRequest]:
        subscription = endpoint.subscription
        now = self._clock()
        return outbound_requests(
            subscription.format,
            delivery,
            endpoint.signing_secrets(now),
            endpoint.routing_key,
            resolve_headers(subscription.headers),
            self._settings.dashboard_url,
            now,
        )

    async def _post_all(
        self, url: str, requests: list[OutboundRequest], delivery: ClaimedDelivery
    ) -> tuple[int | None, str | None, float | None, str | None, bool]:
        """Send the requests in order, stopping at the first that is not answered 2xx;
        the answer is that one's, or the last one's."""
        result: tuple[int | None, str | None, float | None, str | None, bool]
        result = (None, None, None, "nothing to send in this subscription's format", True)
        for body, headers in requests:
            result = await self._post(url, body, headers, delivery)
            status = result[0]
            if status is None or classify(status) is not Outcome.DELIVERED:
                break
        return result

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], delivery: ClaimedDelivery
    ) -> tuple[int | None, str | None, float | None, str | None, bool]:
        assert self._http is not None
        try:
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                text = await _read_prefix(resp)
                retry_after = None
                if classify(resp.status) is Outcome.RETRY:  # 408, 429, 5xx
                    now = datetime.fromtimestamp(self._clock(), UTC)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), now)
                return resp.status, text, retry_after, None, False
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedDestination):
                return None, None, None, f"refused: {exc.os_error}", True
            return None, None, None, f"cannot connect: {exc.os_error or exc}", False
        except TimeoutError:
            return None, None, None, f"timed out after {self._settings.timeout_seconds} s", False
        except (aiohttp.ClientError, ValueError) as exc:
            return None, None, None, f"{type(exc).__name__}: {exc}", False
        except Exception as exc:  # recorded and retried like a network error
            log.exception("webhooks.attempt_failed", delivery_id=delivery.id)
            return None, None, None, f"{type(exc).__name__}: {exc}", False

    def _finish(
        self,
        delivery: ClaimedDelivery,
        endpoint: Endpoint | None,
        status: int | None,
        latency_ms: float,
        response: str | None,
        error: str | None,
        refused: bool,
        retry_after: float | None = None,
    ) -> None:
        now = self._clock()
        attempts = delivery.cycle_attempts + 1
        # The subscription as it is now: a reload may have replaced the one the attempt
        # was claimed with, and what the attempt found must reach the one the scheduler reads.
        live = self._endpoints.get(delivery.subscription_id)
        verdict = settle(
            status,
            attempts,
            now,
            self._settings.retry_schedule_seconds,
            retry_after,
            self._rand,
            live.failing_since if live is not None else None,
            self._settings.disable_after_seconds,
            refused,
        )
        if error is None and verdict.outcome is not Outcome.DELIVERED and status is not None:
            error = f"the endpoint answered {status}"
        if live is not None:
            if verdict.outcome is Outcome.DELIVERED:
                live.failing_since = None
            elif live.failing_since is None:
                live.failing_since = now
            if verdict.disable_reason is not None:
                live.enabled = False
                self._disabling[delivery.subscription_id] = now
                log.warning(
                    "webhooks.subscription_disabled",
                    subscription_id=delivery.subscription_id,
                    reason=verdict.disable_reason,
                )
        self._stats.outcomes["refused" if refused else verdict.outcome.value] += 1
        # The row stays claimed until its result is written, so without session ordering
        # the slot can take another delivery at once; with it, the session's next change
        # becomes eligible only once this result is written.
        ordered = endpoint is not None and endpoint.subscription.ordering is Ordering.SESSION
        if not ordered:
            self._free_slot(delivery.subscription_id)
            self._dirty.add(delivery.subscription_id)
            self._work.set()
        self._results.append(
            AttemptResult(
                Attempt(delivery.id, now, status, round(latency_ms, 2), response, error),
                delivery.subscription_id,
                _STATUS[verdict.outcome],
                attempts,
                verdict.next_attempt_at,
                verdict.disable_reason,
                frees_slot_on_record=ordered,
            )
        )
        self._results_ready.set()


def routing_key_binding(subscription_id: str) -> str:
    """What the encrypted PagerDuty routing key is bound to."""
    return subscription_id + "#routing_key"


def previous_secret_binding(subscription_id: str) -> str:
    """What the encrypted previous secret is bound to (not interchangeable with the current)."""
    return subscription_id + "#previous"


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set or `seconds` have passed. Not `asyncio.wait_for`: on
    Python 3.11 it loses a cancellation that arrives as the event is set, and the loop
    it runs in would then never stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def _read_prefix(resp: aiohttp.ClientResponse) -> str:
    data = b""
    while len(data) < RESPONSE_PREFIX:
        chunk = await resp.content.read(RESPONSE_PREFIX - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")
