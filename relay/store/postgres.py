"""The cluster store: PostgreSQL through an asyncpg pool, shared by several relays.

Ingests are batched per instance (`base.GroupCommit`) and each batch is derived and
written in one transaction, in few round trips:

0. (before the transaction) the seqs of the batch's events already stored are looked up;
1. the facts rows of the batch's sessions are locked (`FOR UPDATE`, in session id
   order, so that two instances never wait on each other in a cycle); a session's
   cached entry is used only if its row's version is still the one cached, otherwise
   its facts are read again (another instance changed them);
2. the batch is derived (`derive.derive_batch`) with seqs counted from 0;
3. late, the event seqs and change ids are taken from the `counters` rows (one
   `UPDATE ... RETURNING`), which stay locked until the commit; one statement writes
   every row of the batch (turns, facts, alert rows, events, changes, sessions); the
   transaction commits.

Because each transaction holds the counter rows from taking its ids to its commit,
ids become visible in id order across instances: a reader past id 10 can never later
see id 9 appear, which a plain sequence does not give (its values are taken by
transactions that may commit in any order). The price is that the last step of
concurrent ingest transactions runs one at a time; it is kept short.

An event already stored by another instance makes the event insert land fewer rows
than sent; the transaction is then rolled back and run again, finding it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson
import structlog

from relay.changes import Commit, StoredChange
from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.logs import RepeatedWarnings
from relay.normalize import decoder
from relay.packed_bodies import CHANGE, pack, pack_event, unpack
from relay.state import affects_state
from relay.store import (
    ApiKey,
    IngestRecord,
    IngestResult,
    StoreUnavailable,
)
from relay.store.base import GroupCommit
from relay.store.derive import (
    NO_SESSION,
    ChangeDraft,
    Derived,
    SessionEntry,
    Thresholds,
    alert_change,
    decode_fired,
    derive_batch,
    encode_fired,
    number_changes,
)
from relay.store.entry_cache import EntryCache
from relay.store.postgres_entries import hold_turns, load_entries
from relay.store.postgres_follows import PostgresFollows
from relay.store.postgres_migrate import migrate_connection
from relay.store.postgres_retention import prune_batch
from relay.store.retention import NOTHING, Pruned, run_pruning
from relay.timefmt import format_unix

log = structlog.get_logger("relay.store")

_IN_FLIGHT = 2  # batches written at once: one derives while the other waits on PostgreSQL
_RETRIES = 5  # a batch whose events another instance stored meanwhile is run again
_PROBE_SECONDS = 1.0
_ALERTS_PER_RUN = 500
_FIRST_KEY_LOCK = 0x72656C62  # held while an instance adds the first API key
# No JIT: every statement of the store is short, and compiling one costs far more (tens to
# hundreds of ms, on every run of a statement whose estimate passes `jit_above_cost`).
# No sequential scan where an index serves: every statement of the store reads and writes
# through indexes, but a new database's tables grow long before autovacuum first analyzes
# them, and a plan cached while they were small (a scan: the cheapest then) would be kept
# for every later run, reading the whole events table for each batch (in `make
# bench-cluster`, PostgreSQL's CPU per event rose from 80 to 490 us in the first minute).
SERVER_SETTINGS = {"jit": "off", "enable_seqscan": "off"}


class _StoredElsewhere(Exception):
    """An event of the batch was stored by another transaction since it was looked up."""


class PostgresStore(PostgresFollows):
    def __init__(
        self,
        settings: StoreSettings,
        providers: Mapping[str, str],
        alerts: AlertSettings,
        retention: RetentionSettings | None = None,
        pool_size: int = 8,
        in_flight: int = _IN_FLIGHT,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._decode = decoder(providers)
        self._thresholds = Thresholds(alerts.turn_stall_seconds, alerts.ready_timeout_seconds)
        self._pool_size = pool_size
        self._in_flight = in_flight
        self._listeners: list[Callable[[Commit], None]] = []
        self._commits: GroupCommit | None = None
        self._cache = EntryCache(settings.cache_bytes)
        self._writable_until = 0.0
        self._closing = False
        self._retention = retention
        self._prune_task: asyncio.Task[None] | None = None
        self._repeated = RepeatedWarnings()
        self.turn_rows_read = 0  # turn rows decoded into entries (a measure of a miss)

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closing = False
        if self._settings.auto_migrate:  # on a connection of its own: no statement timeout
            try:
                await self.migrate()
            except (OSError, asyncpg.PostgresConnectionError) as exc:
                raise StoreUnavailable(f"the store cannot be reached: {exc}") from exc
        try:
            self._pool = await asyncpg.create_pool(
                self._settings.url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._settings.timeout_seconds,
                command_timeout=self._settings.timeout_seconds,
                server_settings=SERVER_SETTINGS,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"the store cannot be reached: {exc}") from exc
        self._commits = GroupCommit(
            self._write_batch,
            self.list_changes,
            _unavailable,
            self._settings.batch_max,
            in_flight=self._in_flight,
            fill_gaps=False,
        )
        self._commits.listeners = self._listeners
        self._commits.start(await self.last_change_id())
        if self._retention is not None and self._retention.keep_seconds is not None:
            self._prune_task = asyncio.create_task(
                run_pruning(self.prune, self._retention, self._retention.keep_seconds, self._warn),
                name="relay-postgres-retention",
            )

    async def close(self) -> None:
        self._closing = True
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
            self._prune_task = None
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def migrate(self) -> list[int]:
        if self._pool is None:
            conn = await asyncpg.connect(self._settings.url)
            try:
                return await migrate_connection(conn)
            finally:
                await conn.close()
        async with self._pool.acquire() as conn:
            return await migrate_connection(conn)

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        self._listeners.append(listener)

    async def prune(self, cutoff: float, limit: int) -> Pruned:
        """One batch of retention (see `postgres_retention`); nothing while another
        instance is pruning."""
        async with self._connected().acquire() as conn:
            pruned = await prune_batch(conn, cutoff, limit)
        if pruned is None:
            return NOTHING
        for session_id in pruned.sessions:
            self._cache.pop(session_id)
        return pruned

    def _warn(self, event: str, error: str) -> None:
        """Log a warning, at most once per 30 s while it repeats (whatever the error)."""
        held_back = self._repeated.admit(event)
        if held_back is not None:
            log.warning(event, error=error, repeats_not_logged=held_back)

    async def check_writable(self) -> None:
        """Ready means a primary that takes writes answers; a success stands for a second."""
        if self._closing or self._pool is None:
            raise StoreUnavailable("the store is closed")
        if time.monotonic() < self._writable_until:
            return
        try:
            async with self._pool.acquire(timeout=self._settings.timeout_seconds) as conn:
                if await conn.fetchval("SELECT pg_is_in_recovery()"):
                    raise StoreUnavailable("the database is read-only (a standby)")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the store cannot write: {exc}") from exc
        self._writable_until = time.monotonic() + _PROBE_SECONDS

    async def check_derived_state(self) -> list[str]:
        from relay.store.postgres_check import check_derived_state

        conn = await asyncpg.connect(self._settings.url)  # a replay has no statement timeout
        try:
            return await check_derived_state(conn, self._decode)
        finally:
            await conn.close()

    # -- ingest ----------------------------------------------------------------------------

    async def ingest(self, record: IngestRecord) -> IngestResult:
        if self._closing or self._commits is None:
            raise StoreUnavailable("the store is closed")
        return await self._commits.ingest(record)

    async def ingest_many(self, records: list[IngestRecord]) -> list[IngestResult]:
        if self._closing or self._commits is None:
            raise StoreUnavailable("the store is closed")
        return await self._commits.ingest_many(records)

    async def _write_batch(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        pool = self._connected()
        for _ in range(_RETRIES):
            held: list[int] = []
            try:
                async with pool.acquire() as conn:
                    existing = await _existing_seqs(conn, batch)  # a race ends in a rerun
                    async with conn.transaction():
                        derived, changes = await self._write_in(conn, batch, existing, held)
            except (_StoredElsewhere, asyncpg.DeadlockDetectedError):
                self._release(held)
                continue
            except BaseException:
                self._release(held)
                raise
            self._remember(derived.entries)
            return derived.results, Commit(changes, derived.versions)
        raise StoreUnavailable("the batch's events kept being stored elsewhere meanwhile")

    async def _write_in(
        self,
        conn: asyncpg.Connection,
        batch: list[IngestRecord],
        existing: dict[tuple[str, str], int],
        held: list[int],
    ) -> tuple[Derived, list[StoredChange]]:
        sessions = sorted(
            {r.event.session_id for r in batch if r.event.session_id and affects_state(r.event)}
        )
        entries = await self._lock_sessions(conn, sessions, batch)
        derived = derive_batch(
            batch, existing, 0, lambda sid: entries.get(sid, NO_SESSION), self._thresholds
        )
        if not (derived.events or derived.changes or derived.sessions or derived.activity):
            return derived, []
        # From here on, the counter rows stay locked until the commit: one statement
        # takes the ids, one writes the batch.
        last = await _take(conn, len(derived.events), len(derived.changes))
        derived = derived.shifted(last.get("event_seq", 0) - len(derived.events))
        before = last.get("change_id", 0) - len(derived.changes)
        changes, rows = number_changes(derived.changes, before)
        if changes:
            self._hold(changes[0].id, held)
        inserted = await conn.fetchval(
            _WRITE,
            *_columns([(*row[:4], pack(row[4], CHANGE), row[5]) for row in derived.turns], 6),
            *_columns(derived.facts, 4),
            *_columns(derived.alert_deletes, 3),
            *_columns(derived.alert_inserts, 4),
            *_columns([(*row[:8], pack_event(row[8])) for row in derived.events], 9),
            *_columns(rows, 6),
            *_columns([(*row[:5], pack(row[5], CHANGE)) for row in derived.sessions], 6),
            list(derived.activity),
            list(derived.activity.values()),
        )
        if inserted != len(derived.events):
            raise _StoredElsewhere
        return derived, changes

    def _hold(self, first: int, held: list[int]) -> None:
        if self._commits is not None:
            self._commits.hold(first)
            held.append(first)

    def _release(self, held: list[int]) -> None:
        if self._commits is not None:
            for first in held:
                self._commits.release(first)

    async def _lock_sessions(
        self, conn: asyncpg.Connection, sessions: list[str], batch: list[IngestRecord]
    ) -> dict[str, SessionEntry]:
        """Lock the sessions' facts rows; their entries, from the cache where it is
        current, else read with their last and running turns (`postgres_entries`), holding
        the turns of the batch's events."""
        if not sessions:
            return {}
        rows = await conn.fetch(_LOCK_SESSIONS, sessions)
        entries: dict[str, SessionEntry] = {}
        stale = []
        for session_id, version, _, _ in rows:
            cached = self._cache.get(session_id)
            if cached is not None and cached.stamp == version:
                entries[session_id] = cached
            else:
                stale.append(session_id)
        if stale:
            wanted = set(stale)
            fresh = [row for row in rows if row[0] in wanted]
            loaded, read = await load_entries(conn, fresh, self._thresholds)
            entries.update(loaded)
            self.turn_rows_read += read
        self.turn_rows_read += await hold_turns(conn, batch, entries)
        return entries

    def _remember(self, entries: dict[str, SessionEntry]) -> None:
        for session_id, entry in entries.items():
            self._cache.put(session_id, entry)

    # -- alerts ----------------------------------------------------------------------------

    async def fire_due_alerts(self, now: float) -> int:
        """Fire what is due, once across instances: a run claims the due rows' sessions
        (their facts rows, `FOR UPDATE SKIP LOCKED`: a session another transaction holds
        waits for the next run), deletes their due rows and writes the changes."""
        commits = self._commits
        if self._closing or commits is None:
            return 0
        now = commits.oldest_unwritten(now)
        held: list[int] = []
        try:
            async with self._connected().acquire() as conn, conn.transaction():
                changes, sessions = await _fire(conn, now, lambda first: self._hold(first, held))
        except BaseException as exc:
            self._release(held)
            if not isinstance(exc, Exception):
                raise
            unavailable = _unavailable(exc)
            if unavailable is not None:
                raise unavailable from exc
            raise
        for session_id in sessions:  # their facts rows' versions moved: read them again
            self._cache.pop(session_id)
        await commits.deliver(Commit(changes, {}))
        return len(changes)

    # -- API keys --------------------------------------------------------------------------

    async def add_api_key(self, key: ApiKey, key_hash: str) -> None:
        await self._execute(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            key.id,
            key.name,
            key_hash,
            " ".join(key.scopes),
            key.created_at,
        )

    async def add_first_api_key(self, key: ApiKey, key_hash: str) -> bool:
        """Under a transaction lock, so that instances starting together add one key."""
        try:
            async with self._connected().acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _FIRST_KEY_LOCK)
                status: str = await conn.execute(
                    "INSERT INTO api_keys (id, name, key_hash, scopes, created_at)"
                    " SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM api_keys)",
                    key.id,
                    key.name,
                    key_hash,
                    " ".join(key.scopes),
                    key.created_at,
                )
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the store cannot write: {exc}") from exc
        return status != "INSERT 0 0"

    async def revoke_api_key(self, key_id: str, revoked_at: str) -> bool:
        status = await self._execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            revoked_at,
            key_id,
        )
        return status != "UPDATE 0"

    async def _execute(self, sql: str, *args: Any) -> str:
        try:
            async with self._connected().acquire() as conn:
                status: str = await conn.execute(sql, *args)
                return status
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the store cannot write: {exc}") from exc


# Insert the sessions' facts rows that do not exist yet and lock those that do, in
# session id order (two transactions then never wait on each other in a cycle). A new
# row's version starts at the database clock in microseconds: past any version that a
# row of the same session pruned earlier reached (each one writes at most once per
# microsecond), so no instance takes its cached entry of that row for the new one.
_LOCK_SESSIONS = (
    "INSERT INTO session_facts (session_id, version)"
    " SELECT session_id, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    " FROM unnest($1::text[]) AS s (session_id) ORDER BY session_id"
    " ON CONFLICT (session_id) DO UPDATE SET version = session_facts.version"
    " RETURNING session_id, version, facts, fired"
)
# Take counter values (name, amount), locking the rows in name order; return the new
# values. The rows stay locked until the commit.
_TAKE = (
    "WITH t (name, amount) AS (SELECT * FROM unnest($1::text[], $2::bigint[])),"
    " locked AS (SELECT c.name FROM counters c JOIN t USING (name) ORDER BY c.name FOR UPDATE)"
    " UPDATE counters c SET value = c.value + t.amount FROM t"
    " WHERE c.name = t.name RETURNING c.name, c.value"
)
# The batch's rows in one statement, run once the ids are taken: the touched turns (new
# ones in order: their position counts), the sessions' facts and their alert rows (the
# deleted and the inserted ones never share a key), the events (returning how many
# landed), the changes, the touched sessions and the newest seq of the untouched ones.
_WRITE = (
    "WITH t AS (INSERT INTO turns (session_id, turn_id, status, version, snapshot, facts)"
    " SELECT s, t, st, v, sn, f FROM unnest($1::text[], $2::text[], $3::text[], $4::int[],"
    " $5::bytea[], $6::bytea[]) WITH ORDINALITY AS r (s, t, st, v, sn, f, n) ORDER BY n"
    " ON CONFLICT (session_id, turn_id) DO UPDATE"
    " SET status = excluded.status, version = excluded.version,"
    " snapshot = excluded.snapshot, facts = excluded.facts),"
    " f AS (INSERT INTO session_facts (session_id, version, facts, fired)"
    " SELECT * FROM unnest($7::text[], $8::bigint[], $9::bytea[], $10::text[])"
    " ON CONFLICT (session_id) DO UPDATE"
    " SET version = excluded.version, facts = excluded.facts, fired = excluded.fired),"
    " d AS (DELETE FROM alerts a USING unnest($11::text[], $12::text[], $13::text[])"
    " AS k (session_id, turn_id, kind) WHERE a.session_id = k.session_id"
    " AND a.turn_id = k.turn_id AND a.kind = k.kind),"
    " i AS (INSERT INTO alerts (session_id, turn_id, kind, due_at)"
    " SELECT * FROM unnest($14::text[], $15::text[], $16::text[], $17::float8[])"
    " ON CONFLICT DO NOTHING),"
    " e AS (INSERT INTO events"
    " (seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload)"
    " SELECT * FROM unnest($18::bigint[], $19::text[], $20::text[], $21::text[], $22::text[],"
    " $23::text[], $24::text[], $25::text[], $26::bytea[]) ON CONFLICT DO NOTHING RETURNING 1),"
    " c AS (INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
    " SELECT * FROM unnest($27::bigint[], $28::text[], $29::text[], $30::text[],"
    " $31::bigint[], $32::bytea[])),"
    " s AS (INSERT INTO sessions"
    " (session_id, version, readiness, turn_status, activity_seq, snapshot)"
    " SELECT * FROM unnest($33::text[], $34::int[], $35::text[], $36::text[], $37::bigint[],"
    " $38::bytea[]) ON CONFLICT (session_id) DO UPDATE"
    " SET version = excluded.version, readiness = excluded.readiness,"
    " turn_status = excluded.turn_status, snapshot = excluded.snapshot,"
    " activity_seq = greatest(sessions.activity_seq, excluded.activity_seq)),"
    " a AS (UPDATE sessions s SET activity_seq = greatest(s.activity_seq, v.seq)"
    " FROM unnest($39::text[], $40::bigint[]) AS v (session_id, seq)"
    " WHERE s.session_id = v.session_id)"
    " SELECT count(*) FROM e"
)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as `width` column lists (statements take a batch as arrays)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


async def _take(conn: asyncpg.Connection, events: int, changes: int) -> dict[str, int]:
    """Take `events` event seqs and `changes` change ids; the counters' new values."""
    wanted = {name: n for name, n in (("event_seq", events), ("change_id", changes)) if n}
    if not wanted:
        return {}
    rows = await conn.fetch(_TAKE, list(wanted), list(wanted.values()))
    return {row[0]: row[1] for row in rows}


async def _existing_seqs(
    conn: asyncpg.Connection, batch: list[IngestRecord]
) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        "SELECT e.source, e.event_id, e.seq FROM events e"
        " JOIN unnest($1::text[], $2::text[]) AS k (source, event_id)"
        " ON e.source = k.source AND e.event_id = k.event_id",
        [r.event.source for r in batch],
        [r.event.id for r in batch],
    )
    return {(source, event_id): seq for source, event_id, seq in rows}


async def _append_changes(
    conn: asyncpg.Connection,
    drafts: list[ChangeDraft],
    hold: Callable[[int], None] | None = None,
) -> list[StoredChange]:
    """Take the drafts' ids from the counter row (locked until the commit), `hold` the
    first and insert them."""
    last = (await _take(conn, 0, len(drafts)))["change_id"]
    changes, rows = number_changes(drafts, last - len(drafts))
    if hold is not None:
        hold(changes[0].id)
    await conn.execute(
        "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
        " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],"
        " $5::bigint[], $6::bytea[])",
        *_columns(rows, 6),
    )
    return changes


async def _snapshots(conn: asyncpg.Connection, rows: Sequence[Any]) -> dict[tuple[str, str], bytes]:
    """The stored snapshots of the sessions (key turn "") and turns of fired alerts."""
    sessions = sorted({row[0] for row in rows})
    found: dict[tuple[str, str], bytes] = {}
    for session_id, snapshot in await conn.fetch(
        "SELECT session_id, snapshot FROM sessions WHERE session_id = ANY($1::text[])", sessions
    ):
        found[(session_id, "")] = unpack(snapshot)
    turn_keys = [(row[0], row[1]) for row in rows if row[1]]
    if turn_keys:
        for session_id, turn_id, snapshot in await conn.fetch(
            "SELECT t.session_id, t.turn_id, t.snapshot FROM turns t"
            " JOIN unnest($1::text[], $2::text[]) AS k (session_id, turn_id)"
            " ON t.session_id = k.session_id AND t.turn_id = k.turn_id",
            [k[0] for k in turn_keys],
            [k[1] for k in turn_keys],
        ):
            found[(session_id, turn_id)] = unpack(snapshot)
    return found


async def _fire(
    conn: asyncpg.Connection, now: float, hold: Callable[[int], None]
) -> tuple[list[StoredChange], list[str]]:
    """Claim the due alerts' sessions, delete their due rows, mark them fired in the
    sessions' facts and append their changes; return those and the sessions."""
    due = await conn.fetch(
        "SELECT DISTINCT session_id FROM"
        " (SELECT session_id FROM alerts WHERE due_at <= $1 ORDER BY due_at LIMIT $2) d",
        now,
        _ALERTS_PER_RUN,
    )
    if not due:
        return [], []
    claimed = await conn.fetch(
        "SELECT session_id, fired FROM session_facts"
        " WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR UPDATE SKIP LOCKED",
        [row[0] for row in due],
    )
    fired_rows = await conn.fetch(
        "DELETE FROM alerts WHERE session_id = ANY($1::text[]) AND due_at <= $2"
        " RETURNING session_id, turn_id, kind, due_at",
        [row[0] for row in claimed],
        now,
    )
    if not fired_rows:
        return [], []
    snapshots = await _snapshots(conn, fired_rows)
    marks = {session_id: decode_fired(fired) for session_id, fired in claimed}
    drafts: list[ChangeDraft] = []
    for session_id, turn_id, kind, _ in sorted(fired_rows, key=lambda r: (r[3], *r[:3])):
        session = snapshots.get((session_id, ""))
        turn = snapshots.get((session_id, turn_id)) if turn_id else None
        drafts.append(
            alert_change(
                kind,
                format_unix(now),
                session_id,
                turn_id,
                None if session is None else orjson.Fragment(session),
                None if turn is None else orjson.Fragment(turn),
            )
        )
        marks[session_id] = marks[session_id] | {(kind, turn_id)}
    sessions = sorted({row[0] for row in fired_rows})
    await conn.executemany(
        "UPDATE session_facts SET fired = $2, version = version + 1 WHERE session_id = $1",
        [(session_id, encode_fired(marks[session_id])) for session_id in sessions],
    )
    return await _append_changes(conn, drafts, hold), sessions


def _unavailable(exc: Exception) -> StoreUnavailable | None:
    if isinstance(
        exc, OSError | asyncio.TimeoutError | asyncpg.PostgresError | asyncpg.InterfaceError
    ):
        return StoreUnavailable(f"the store cannot write: {exc}")
    return None
