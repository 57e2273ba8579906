"""The store interface. Backends are chosen by URL scheme and imported lazily."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.events import Event

if TYPE_CHECKING:
    from relay.changes import Commit, StoredChange


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


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    version: int
    snapshot: bytes  # SessionState as JSON
    activity_seq: int


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """One page of sessions, newest activity first, as of event `as_of_seq`.

    Paging stays exact while data changes: order and membership are those at
    `as_of_seq`; `after` is the (activity seq, session id) of the last item seen.
    """

    as_of_seq: int
    after: tuple[int, str] | None = None
    limit: int = 50
    readiness: str | None = None
    turn_status: str | None = None


@dataclass(frozen=True, slots=True)
class Follow:
    """A follow of an upstream session stream: its position (the last SSE id stored),
    state (following, backoff, idle, deleted), failed attempts in a row, connections
    made again, the last error, and the instance holding its lease."""

    source: str
    session_id: str
    position: str | None
    state: str
    attempts: int
    reconnects: int
    last_error: str | None
    created_at: str
    updated_at: str
    owner: str | None
    lease_until: float


# Follows in these states run (on the instance holding the lease); others have stopped.
ACTIVE_FOLLOW_STATES = ("following", "backoff")
# The follows table's columns, read in the order of Follow's fields, on every backend.
FOLLOW_COLUMNS = (
    "source, session_id, position, state, attempts, reconnects, last_error, created_at,"
    " updated_at, owner, lease_until"
)
_FOLLOW_UPDATABLE = frozenset(
    {"position", "state", "attempts", "reconnects", "last_error", "lease_until"}
)
# The events table's columns, as event reads take them.
EVENT_COLUMNS = (
    "seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload"
)


def check_follow_changes(changes: Mapping[str, object]) -> None:
    """Refuse a follow update naming a field that an update may not set."""
    unknown = set(changes) - _FOLLOW_UPDATABLE
    if unknown:
        raise ValueError(f"not a follow field: {sorted(unknown)}")


# Rebuilds an Event from a stored row: (source, raw payload, received_at RFC 3339).
EventDecoder = Callable[[str, bytes, str], Event]


class Store(Protocol):
    async def open(self) -> None:
        """Connect, and apply pending migrations when the settings ask for it."""

    async def close(self) -> None:
        """Finish queued writes, then release every connection."""

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied."""

    async def ingest(self, record: IngestRecord) -> IngestResult:
        """Store an event once per (source, id); return only after it is committed."""

    async def ingest_many(self, records: list[IngestRecord]) -> list[IngestResult]:
        """Store events in one transaction, each once per (source, id)."""

    async def list_events(self, after: int, limit: int) -> list[StoredEvent]:
        """Events with `seq > after`, oldest first."""

    async def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write could be committed now."""

    async def add_api_key(self, key: ApiKey, key_hash: str) -> None: ...

    async def add_first_api_key(self, key: ApiKey, key_hash: str) -> bool:
        """Add the key only if the store has none at all; whether it was added (of
        relays starting together on one store, one adds its key)."""

    async def list_api_keys(self) -> list[ApiKey]: ...

    async def revoke_api_key(self, key_id: str, revoked_at: str) -> bool: ...

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not."""

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        """Call `listener` (on the event loop) with what each commit produced."""

    async def fire_due_alerts(self, now: float) -> int:
        """Record alerts due by `now` as changes; return how many fired."""

    async def get_session(self, session_id: str) -> SessionRow | None: ...

    async def list_sessions(self, query: SessionQuery) -> list[SessionRow]: ...

    async def last_seq(self) -> int: ...

    async def last_change_id(self) -> int: ...

    async def list_turns(self, session_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """(cursor, TurnState JSON) pairs in the order turns were first seen."""

    async def list_session_events(
        self, session_id: str, after: int, limit: int
    ) -> list[StoredEvent]: ...

    async def list_changes(
        self, after: int, limit: int, types: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        """Changes with `id > after`, oldest first, of the given types (globs) if any, and
        of none of the types in `exclude`."""

    async def list_session_changes(
        self, session_id: str, after: int, limit: int, exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        """One session's changes with `id > after`, oldest first, of none of the types in
        `exclude`; read without going through other sessions' changes."""

    async def check_derived_state(self) -> list[str]:
        """Replay every stored event; list where stored state or changes differ."""

    async def start_follow(self, source: str, session_id: str, now: str) -> Follow:
        """Add a follow (state `following`), or start a stopped one again from its
        position; a running one is left as it is."""

    async def list_follows(self, source: str) -> list[Follow]:
        """A source's follows, oldest first."""

    async def claim_follows(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Follow]:
        """Take the lease of running follows whose lease is free (expired) or `owner`'s,
        until `lease_until`; return those `owner` holds now."""

    async def update_follow(
        self,
        owner: str,
        source: str,
        session_id: str,
        changes: Mapping[str, object],
        now: str,
    ) -> bool:
        """Set `changes` (position, state, attempts, reconnects, last_error, lease_until)
        if `owner` still holds the lease; False if it does not."""

    async def release_follows(self, owner: str) -> None:
        """Free `owner`'s leases (on a clean shutdown), for another instance at once."""


def is_embedded(url: str) -> bool:
    """Whether the store URL names the embedded SQLite store (one relay per file)."""
    return url.startswith("sqlite://")


def data_directory(url: str) -> Path:
    """Where the relay keeps its own files (generated secrets, keys): the SQLite store's
    directory, or `data` in the working directory for a store on a server."""
    if is_embedded(url):
        return Path(url.removeprefix("sqlite://").removeprefix("/")).parent
    return Path("data")


def open_store(
    settings: StoreSettings,
    providers: Mapping[str, str] | None = None,
    alerts: AlertSettings | None = None,
    retention: RetentionSettings | None = None,
) -> Store:
    """Build (not yet open) the backend named by the URL's scheme.

    `providers` maps source ids to provider names, to read stored events back with
    their source's normaliser; `alerts` sets the thresholds; with `retention`, what is
    older is pruned in the background while the store is open.
    """
    scheme = settings.url.partition("://")[0]
    if scheme == "sqlite":
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(settings, providers or {}, alerts or AlertSettings(), retention)
    if scheme in ("postgresql", "postgres"):
        from relay.store.postgres import PostgresStore

        return PostgresStore(settings, providers or {}, alerts or AlertSettings(), retention)
    raise ValueError(f"no store backend for URL scheme {scheme!r}")
