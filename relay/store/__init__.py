"""The store interface. Backends are chosen by URL scheme and imported lazily."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from relay.config import StoreSettings
from relay.events import Event


class StoreUnavailable(Exception):
    """The store cannot take a write right now; the client should retry."""


class IngestRecord(NamedTuple):
    event: Event
    body: bytes
    received_at: datetime


class IngestResult(NamedTuple):
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    source: str
    id: str
    type: str
    session_id: str | None
    turn_id: str | None
    occurred_at: str
    received_at: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None = None


class Store(Protocol):
    async def open(self) -> None:
        """Connect, and apply pending migrations when the settings ask for it."""

    async def close(self) -> None:
        """Finish queued writes, then release every connection."""

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied."""

    async def ingest(self, record: IngestRecord) -> IngestResult:
        """Store an event once per (source, id); return only after it is committed."""

    async def list_events(self, after: int, limit: int) -> list[StoredEvent]:
        """Events with `seq > after`, oldest first."""

    async def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write could be committed now."""

    async def add_api_key(self, key: ApiKey, key_hash: str) -> None: ...

    async def list_api_keys(self) -> list[ApiKey]: ...

    async def revoke_api_key(self, key_id: str, revoked_at: str) -> bool: ...

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not."""


def open_store(settings: StoreSettings) -> Store:
    """Build (not yet open) the backend named by the URL's scheme."""
    scheme = settings.url.partition("://")[0]
    if scheme == "sqlite":
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(settings)
    raise ValueError(f"no store backend for URL scheme {scheme!r}")
