"""The delivery store interface: subscriptions, the delivery queue and the attempt log.

The embedded backend keeps them in the relay's SQLite file, on connections of its own.
The PostgreSQL backend (cluster mode) implements the same methods for several instances
at once: the rows decide what may be claimed (a claim checks the subscription's state and
the deliveries in flight on every instance, and takes rows `FOR UPDATE SKIP LOCKED`),
where SQLite relies on its single writer and the dispatcher's own view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relay.config import StoreSettings
from relay.webhooks.model import (
    Attempt,
    AttemptResult,
    ClaimedDelivery,
    Delivery,
    DeliveryStatus,
    PreviousSecret,
    Subscription,
)


class DeliveryNotRetryable(Exception):
    """The delivery is being attempted right now."""


class SecretChanged(Exception):
    """The subscription's secret is no longer the one a rotation started from."""


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    subscription_id: str
    limit: int
    session_ordered: bool


class DeliveryStore(Protocol):
    # Several instances share it: deliveries appear, are released and change state
    # through other instances too, so a dispatcher looks at every subscription each poll.
    shared: bool

    async def open(self) -> None:
        """Connect (the schema is the main store's migrations)."""

    async def close(self) -> None: ...

    async def release_claims(self, now: float) -> int:
        """Make claimed deliveries due now (after a restart: their attempts were lost).
        Embedded: every claimed one. Shared by several instances: only those whose lease
        has ended or whose instance is gone (the others may be attempted elsewhere right
        now)."""

    async def add_subscription(self, subscription: Subscription) -> Subscription:
        """Store it; it receives changes after the newest one in the log (its `start_after`)."""

    async def get_subscription(self, subscription_id: str) -> Subscription | None: ...

    async def list_subscriptions(self) -> list[Subscription]:
        """All of them, oldest first."""

    async def page_subscriptions(
        self, after: int, limit: int
    ) -> tuple[list[Subscription], int | None]:
        """Up to `limit` of them, oldest first, after the cursor `after` (0: the first);
        with the cursor of the next page, None if there is none."""

    async def update_subscription(
        self, subscription_id: str, fields: Mapping[str, Any]
    ) -> Subscription | None:
        """Set columns of a subscription; None if there is no such subscription."""

    async def rotate_secret(
        self,
        subscription_id: str,
        current: bytes,
        new: bytes,
        previous: PreviousSecret | None,
        now: float,
        updated_at: str,
    ) -> Subscription | None:
        """In one transaction, if the secret is still `current`: make `new` the secret, add
        `previous` (the old one, re-encrypted) to the previous secrets and drop those ended
        by `now`. None if there is no such subscription; SecretChanged if another rotation
        came first."""

    async def delete_subscription(self, subscription_id: str) -> bool:
        """Remove it with its deliveries and attempts."""

    async def enqueue(self, limit: int, now: float) -> tuple[int, dict[str, int]]:
        """Turn up to `limit` changes after the cursor into delivery rows, and move the
        cursor, in one transaction; return how many changes were read and how many rows
        each subscription got."""

    async def claim(
        self, requests: Sequence[ClaimRequest], clock: Callable[[], float], lease_seconds: float
    ) -> tuple[list[ClaimedDelivery], dict[str, float]]:
        """Take deliveries due at `clock()` (read when the claim runs) for an attempt, marking
        them delivering for `lease_seconds`. Embedded, a delivering row is never claimed
        again: only `release_claims` (on start) makes it due. Shared by several instances,
        it is claimed again once its lease has ended (its instance is presumed gone), and
        the claim itself skips a subscription that is disabled or removed and takes no
        more than `max_in_flight` minus the deliveries leased on every instance.

        Returns the deliveries, and for each subscription asked about that still has
        deliveries waiting, when the earliest one is due (shared: a lease held by another
        instance counts as due when it ends; a disabled subscription has none). A
        session-ordered request gets only the oldest unfinished delivery of each session.
        """

    async def record(self, results: Sequence[AttemptResult]) -> None:
        """Log the attempts and move each delivery (and subscription) on, in one transaction."""

    async def add_test_delivery(
        self, subscription_id: str, body: bytes, now: float
    ) -> Delivery | None: ...

    async def get_delivery(self, delivery_id: int) -> Delivery | None: ...

    async def list_deliveries(
        self, subscription_id: str, status: DeliveryStatus | None, after: int, limit: int
    ) -> list[Delivery]:
        """Deliveries of a subscription with `id > after`, oldest first."""

    async def list_attempts(self, delivery_ids: Sequence[int]) -> dict[int, list[Attempt]]: ...

    async def retry_delivery(self, delivery_id: int, now: float) -> Delivery | None:
        """Make a delivery due now with a fresh retry schedule; raise DeliveryNotRetryable
        if it is being attempted."""

    async def recover(self, subscription_id: str, since: str, now: float) -> int:
        """Queue again every change since the time `since` (RFC 3339) that the subscription
        did not receive: failed deliveries and changes it has no delivery for. The changes
        are those of events received since then, and the alerts after the last change of
        an event received before then."""

    async def queue_depth(self) -> int:
        """Deliveries not yet delivered or failed."""

    async def queue_depths(self, subscription_ids: Sequence[str]) -> dict[str, int]:
        """Deliveries not yet delivered or failed, of each of these subscriptions."""


def open_delivery_store(settings: StoreSettings) -> DeliveryStore:
    """Build (not yet open) the delivery store next to the main store, by URL scheme."""
    scheme = settings.url.partition("://")[0]
    if scheme == "sqlite":
        from relay.webhooks.sqlite_store import SQLiteDeliveryStore

        return SQLiteDeliveryStore(settings)
    if scheme in ("postgresql", "postgres"):
        from relay.webhooks.postgres_store import PostgresDeliveryStore

        return PostgresDeliveryStore(settings)
    raise ValueError(f"no delivery store backend for URL scheme {scheme!r}")
