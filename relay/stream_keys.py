"""Open streams by the API key that opened them, so that revoking a key ends them.

A key is revoked in the store, often by another process (`relay keys revoke`), so the
relay does not hear of it: every `sse.key_check_seconds`, while any stream is open, it
reads which keys are revoked and ends the streams opened with one of them (cleanly, so
the client sees the stream end and its reconnection gets 401).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from relay.hub import Subscription
from relay.store import Store


class StreamKeys:
    """Which open stream subscriptions each API key holds."""

    def __init__(self) -> None:
        self._streams: dict[str, set[Subscription]] = {}

    @contextmanager
    def track(self, key_id: str, subscription: Subscription) -> Iterator[None]:
        streams = self._streams.setdefault(key_id, set())
        streams.add(subscription)
        try:
            yield
        finally:
            streams.discard(subscription)
            if not streams and self._streams.get(key_id) is streams:
                del self._streams[key_id]

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._streams)

    def end(self, key_ids: Iterable[str]) -> int:
        """End every stream opened with one of `key_ids`; return how many there were."""
        ended = 0
        for key_id in key_ids:
            for subscription in self._streams.pop(key_id, ()):
                subscription.close()
                ended += 1
        return ended


async def end_revoked(store: Store, streams: StreamKeys) -> int:
    """End the streams of keys the store says are revoked (one read, only if any is open)."""
    if not streams.key_ids:
        return 0
    revoked = {key.id for key in await store.list_api_keys() if key.revoked_at is not None}
    return streams.end(revoked & streams.key_ids)
