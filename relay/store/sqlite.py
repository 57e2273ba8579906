"""The embedded store: one SQLite file in WAL mode.

Ingests go through one writer: concurrent ingests queue up while a batch is being
committed and are then written together in a single transaction (group commit, see
`base.GroupCommit`). Each request is answered only after the commit of its batch.
The batch writer runs in a
writer process of its own by default (see `writer_process`), or on a dedicated thread
with `store.writer = "thread"`. Other writes (API keys, migrations) use a stdlib
`sqlite3` connection on one thread of this process; reads use a small pool of aiosqlite
connections (see `sqlite_reads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from relay.changes import (
    RAW_EVENT_COLUMNS,
    Commit,
    StoredChange,
    glob_pattern,
    sql_glob,
    stored_body,
)
from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.logs import RepeatedWarnings
from relay.normalize import decoder
from relay.packed_bodies import unpack
from relay.store import (
    ACTIVE_FOLLOW_STATES,
    EVENT_COLUMNS,
    FOLLOW_COLUMNS,
    ApiKey,
    Follow,
    IngestRecord,
    IngestResult,
    SessionQuery,
    SessionRow,
    StoredEvent,
    StoreUnavailable,
    check_follow_changes,
)
from relay.store.base import GroupCommit
from relay.store.reconnect import Reconnecting
from relay.store.retention import Pruned, run_pruning
from relay.store.sqlite_reads import (
    CHANGE_TYPES,
    ReadPool,
    changes_query,
    session_changes_query,
)
from relay.store.sqlite_writer import BatchWriter
from relay.store.writer_process import WriterProcess, sqlite_config
from relay.timefmt import format_time, utcnow

T = TypeVar("T")
log = structlog.get_logger("relay.store")


# A page of sessions as of event `as_of`, newest activity first: those whose activity is
# at most `as_of` come straight from the activity index (an activity seq is one event's,
# so no two sessions share one); the few that moved since are placed where their newest
# event up to `as_of` puts them. `top` and `after_*` are the cursor's keyset.
_SESSION_PAGE = """
SELECT session_id, version, snapshot, act FROM (
    SELECT session_id, version, snapshot, activity_seq AS act FROM sessions
    WHERE activity_seq <= :top AND NOT (activity_seq = :after_act AND session_id >= :after_id)
      AND (:readiness IS NULL OR readiness = :readiness)
      AND (:turn_status IS NULL OR turn_status = :turn_status)
    ORDER BY activity_seq DESC
    LIMIT :limit
)
UNION ALL
SELECT session_id, version, snapshot, act FROM (
    SELECT s.session_id, s.version, s.snapshot, (
        SELECT max(e.seq) FROM events e WHERE e.session_id = s.session_id AND e.seq <= :as_of
    ) AS act
    FROM sessions s
    WHERE s.activity_seq > :as_of
      AND (:readiness IS NULL OR s.readiness = :readiness)
      AND (:turn_status IS NULL OR s.turn_status = :turn_status)
)
WHERE act IS NOT NULL AND act <= :top AND NOT (act = :after_act AND session_id >= :after_id)
ORDER BY act DESC, session_id DESC
LIMIT :limit
"""


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
    return Path(url.removeprefix("sqlite://").removeprefix("/"))


def migrations() -> list[tuple[int, str]]:
    """The packaged migrations as (version, SQL), in order."""
    found = []
    for entry in resources.files("relay.store").joinpath("migrations").iterdir():
        match = re.match(r"(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return sorted(found)


_PROBE_SECONDS = 1.0  # how long a readiness probe's outcome stands


class SQLiteStore:
    def __init__(
        self,
        settings: StoreSettings,
        providers: Mapping[str, str],
        alerts: AlertSettings,
        retention: RetentionSettings | None = None,
    ) -> None:
        self._settings = settings
        self._retention = retention
        self._providers = dict(providers)
        self._decode = decoder(providers)
        self._alerts = alerts
        self._listeners: list[Callable[[Commit], None]] = []
        self._commits: GroupCommit | None = None
        self._path = sqlite_path(settings.url)
        self._executor = _writer_thread()
        self._writer: Reconnecting | None = None  # used on the writer thread only
        self._writable_until = 0.0  # monotonic time until which a probe's success stands
        self._probing = asyncio.Lock()
        self._repeated = RepeatedWarnings()
        self._batch_writer: _BatchChannel | None = None
        self._reader: ReadPool | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        if self._writer is not None and self._commits is not None:
            return
        self._closing = False
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._in_writer(Reconnecting, self._connect_writer)
        if self._settings.auto_migrate:
            await self.migrate()
        if self._settings.writer == "process":
            self._batch_writer = WriterProcess(
                sqlite_config(self._path, self._settings, self._alerts, self._providers)
            )
        else:
            self._batch_writer = _ThreadChannel(
                BatchWriter(
                    self._writer.conn,
                    self._decode,
                    self._alerts.turn_stall_seconds,
                    self._alerts.ready_timeout_seconds,
                    self._settings.cache_bytes,
                ),
                self._on_connection,
            )
        self._reader = await ReadPool.open(self._path, self._settings.busy_timeout_ms)
        batch_writer = self._batch_writer
        self._commits = GroupCommit(
            batch_writer.write,
            self.list_changes,
            _unavailable,
            self._settings.batch_max,
            in_flight=2 if self._settings.writer == "process" else 1,
        )
        self._commits.listeners = self._listeners
        self._commits.start(await self.last_change_id())
        if self._settings.writer == "process":
            self._checkpoint_task = asyncio.create_task(
                self._checkpoint_loop(), name="relay-sqlite-checkpoints"
            )
        if self._retention is not None and self._retention.keep_seconds is not None:
            self._prune_task = asyncio.create_task(
                self._prune_loop(self._retention, self._retention.keep_seconds),
                name="relay-sqlite-retention",
            )

    async def close(self) -> None:
        self._closing = True
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        for task in (self._checkpoint_task, self._prune_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._checkpoint_task = self._prune_task = None
        if self._batch_writer is not None:
            await self._batch_writer.close()
            self._batch_writer = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            await self._in_writer(self._writer.close)
            self._writer = None
        self._executor.shutdown(wait=True)
        self._executor = _writer_thread()

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._settings.synchronous}")
        conn.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_ms)}")
        return conn

    async def _in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _on_connection(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, *args)` on the writer thread; a connection that fails for
        another reason than contention is opened again before its next use."""
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return await self._in_writer(_use, self._writer, fn, *args)

    async def migrate(self) -> list[int]:
        if self._writer is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._in_writer(Reconnecting, self._connect_writer)
        return await self._on_connection(_migrate)

    # -- ingest: group commit (see `base.GroupCommit`) ----------------------------------

    async def ingest(self, record: IngestRecord) -> IngestResult:
        return (await self.ingest_many([record]))[0]

    async def ingest_many(self, records: list[IngestRecord]) -> list[IngestResult]:
        if self._closing or self._commits is None:
            raise StoreUnavailable("the store is closed")
        return await self._commits.ingest_many(records)

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database file, mostly off the commit path.

        This process copies, on its own connection, every `checkpoint_interval_seconds`;
        a passive checkpoint never blocks the writer. The writer process still checkpoints
        when the WAL passes 8 MiB, which then has little left to copy: that is what lets
        the WAL start over from its beginning (see `writer_process.main`).
        """
        assert self._writer is not None
        while True:
            await asyncio.sleep(self._settings.checkpoint_interval_seconds)
            try:
                await self._on_connection(_checkpoint)
            except sqlite3.Error as exc:
                self._warn("store.checkpoint_failed", str(exc))

    async def _prune_loop(self, retention: RetentionSettings, keep_seconds: float) -> None:
        """Delete what is older than the retention, in small batches with pauses between
        them, so that ingest never waits long behind pruning (see `retention`)."""
        writer = self._batch_writer
        assert writer is not None
        await run_pruning(writer.prune, retention, keep_seconds, self._warn)

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        self._listeners.append(listener)

    async def fire_due_alerts(self, now: float) -> int:
        commits = self._commits
        if self._closing or self._batch_writer is None or commits is None:
            return 0
        commit = await self._batch_writer.fire_due_alerts(commits.oldest_unwritten(now))
        await commits.deliver(commit)
        return len(commit.changes)

    async def check_derived_state(self) -> list[str]:
        from relay.store.rebuild import check_derived_state

        return await self._on_connection(check_derived_state, self._decode)

    async def check_writable(self) -> None:
        """Commit a write that changes nothing through the ingest writer: ready means that
        writes commit, not that the file opens. A success stands for `_PROBE_SECONDS`."""
        async with self._probing:
            if self._closing or self._batch_writer is None:
                raise StoreUnavailable("the store is closed")
            if time.monotonic() < self._writable_until:
                return
            error = await _probe(self._batch_writer)
            if error is not None:
                self._warn("store.not_writable", str(error))
                raise error
            self._writable_until = time.monotonic() + _PROBE_SECONDS

    def _warn(self, event: str, error: str) -> None:
        """Log a warning, at most once per 30 s while it repeats (whatever the error)."""
        held_back = self._repeated.admit(event)
        if held_back is not None:
            log.warning(event, error=error, repeats_not_logged=held_back)

    # -- reads ---------------------------------------------------------------------------

    async def list_events(self, after: int, limit: int) -> list[StoredEvent]:
        rows = await self._read(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [StoredEvent(*row) for row in rows]

    async def last_seq(self) -> int:
        rows = await self._read("SELECT coalesce(max(seq), 0) FROM events", ())
        return int(rows[0][0])

    async def last_change_id(self) -> int:
        rows = await self._read("SELECT coalesce(max(id), 0) FROM changes", ())
        return int(rows[0][0])

    async def get_session(self, session_id: str) -> SessionRow | None:
        rows = await self._read(
            "SELECT session_id, version, snapshot, activity_seq FROM sessions WHERE session_id = ?",
            (session_id,),
        )
        if not rows:
            return None
        sid, version, snapshot, act = rows[0]
        return SessionRow(sid, version, unpack(snapshot), act)

    async def list_sessions(self, query: SessionQuery) -> list[SessionRow]:
        after_act, after_id = query.after or (-1, "")
        top = query.as_of_seq if query.after is None else min(query.as_of_seq, after_act)
        rows = await self._read(
            _SESSION_PAGE,
            {
                "as_of": query.as_of_seq,
                "top": top,
                "readiness": query.readiness,
                "turn_status": query.turn_status,
                "after_act": after_act,
                "after_id": after_id,
                "limit": query.limit,
            },
        )
        return [
            SessionRow(sid, version, unpack(snapshot), act) for sid, version, snapshot, act in rows
        ]

    async def list_turns(self, session_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._read(
            "SELECT rowid, snapshot FROM turns WHERE session_id = ? AND rowid > ?"
            " ORDER BY rowid LIMIT ?",
            (session_id, after, limit),
        )
        return [(rowid, unpack(snapshot)) for rowid, snapshot in rows]

    async def list_session_events(
        self, session_id: str, after: int, limit: int
    ) -> list[StoredEvent]:
        rows = await self._read(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE session_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (session_id, after, limit),
        )
        return [StoredEvent(*row) for row in rows]

    async def list_changes(
        self, after: int, limit: int, types: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        if not exclude and any(c in t for t in types for c in "*?"):
            # Globs become the types in the log they match, each read through its index.
            pattern = glob_pattern(types)
            types = tuple(t for (t,) in await self._read(CHANGE_TYPES, ()) if pattern.fullmatch(t))
            if not types:
                return []
        rows = await self._read(
            *changes_query(RAW_EVENT_COLUMNS, after, limit, types, exclude, sql_glob)
        )
        return [
            StoredChange(row[0], row[1], row[2], row[3], stored_body(row[0], row[4], row[5:]))
            for row in rows
        ]

    async def list_session_changes(
        self, session_id: str, after: int, limit: int, exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        rows = await self._read(
            *session_changes_query(RAW_EVENT_COLUMNS, session_id, after, limit, exclude, sql_glob)
        )
        return [
            StoredChange(row[0], row[1], row[2], row[3], stored_body(row[0], row[4], row[5:]))
            for row in rows
        ]

    async def _read(self, sql: str, params: Any) -> list[Any]:
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        return await self._reader.read(sql, params)

    # -- API keys --------------------------------------------------------------------------

    async def add_api_key(self, key: ApiKey, key_hash: str) -> None:
        await self._write(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES (?, ?, ?, ?, ?)",
            (key.id, key.name, key_hash, " ".join(key.scopes), key.created_at),
        )

    async def add_first_api_key(self, key: ApiKey, key_hash: str) -> bool:
        added = await self._write(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_at)"
            " SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM api_keys)",
            (key.id, key.name, key_hash, " ".join(key.scopes), key.created_at),
        )
        return added > 0

    async def list_api_keys(self) -> list[ApiKey]:
        rows = await self._read(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at",
            (),
        )
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, key_id: str, revoked_at: str) -> bool:
        changed = await self._write(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (revoked_at, key_id),
        )
        return changed > 0

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        rows = await self._read(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_keys WHERE key_hash = ?",
            (key_hash,),
        )
        return _api_key(rows[0]) if rows else None

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        return await self._on_connection(_execute_write, sql, params)

    # -- follows -----------------------------------------------------------------------------

    async def start_follow(self, source: str, session_id: str, now: str) -> Follow:
        await self._write(
            "INSERT INTO follows (source, session_id, state, created_at, updated_at)"
            " VALUES (?, ?, 'following', ?, ?) ON CONFLICT (source, session_id) DO UPDATE"
            " SET state = 'following', attempts = 0, last_error = NULL, updated_at = ?"
            f" WHERE state NOT IN {ACTIVE_FOLLOW_STATES}",
            (source, session_id, now, now, now),
        )
        rows = await self._read(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE source = ? AND session_id = ?",
            (source, session_id),
        )
        return Follow(*rows[0])

    async def list_follows(self, source: str) -> list[Follow]:
        rows = await self._read(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE source = ? ORDER BY created_at, rowid",
            (source,),
        )
        return [Follow(*row) for row in rows]

    async def claim_follows(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Follow]:
        rows: list[Any] = await self._on_connection(_claim_follows, owner, now, lease_until, limit)
        return [Follow(*row) for row in rows]

    async def update_follow(
        self,
        owner: str,
        source: str,
        session_id: str,
        changes: Mapping[str, object],
        now: str,
    ) -> bool:
        check_follow_changes(changes)
        assignments = ", ".join(f"{name} = ?" for name in changes)
        changed = await self._write(
            f"UPDATE follows SET {assignments}, updated_at = ?"
            " WHERE source = ? AND session_id = ? AND owner = ?",
            (*changes.values(), now, source, session_id, owner),
        )
        return changed > 0

    async def release_follows(self, owner: str) -> None:
        await self._write("UPDATE follows SET lease_until = 0 WHERE owner = ?", (owner,))


class _BatchChannel(Protocol):
    """Where batches are written: a writer process, or a thread of this process."""

    async def write(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]: ...

    async def fire_due_alerts(self, now: float) -> Commit: ...

    async def probe(self) -> None:
        """Commit a write that changes nothing."""

    async def prune(self, cutoff: float, limit: int) -> Pruned:
        """Delete one small batch of what was received before `cutoff`."""

    async def close(self) -> None: ...


class _ThreadChannel:
    """The batch writer on the store's writer thread, on the store's current connection."""

    def __init__(self, writer: BatchWriter, run: Callable[..., Awaitable[Any]]) -> None:
        self._writer = writer
        self._run = run  # runs a function of the connection on the writer thread

    async def write(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        result: tuple[list[IngestResult], Commit] = await self._run(self._call, "write", batch)
        return result

    async def fire_due_alerts(self, now: float) -> Commit:
        commit: Commit = await self._run(self._call, "fire_due_alerts", now)
        return commit

    async def probe(self) -> None:
        await self._run(self._call, "probe")

    async def prune(self, cutoff: float, limit: int) -> Pruned:
        pruned: Pruned = await self._run(self._call, "prune", cutoff, limit)
        return pruned

    def _call(self, conn: sqlite3.Connection, method: str, *args: Any) -> Any:
        self._writer.conn = conn
        return getattr(self._writer, method)(*args)

    async def close(self) -> None:
        pass


def _unavailable(exc: Exception) -> StoreUnavailable | None:
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"the store cannot write: {exc}")
    return None


def _writer_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite-writer")


def _api_key(row: Any) -> ApiKey:
    key_id, name, scopes, created_at, revoked_at = row
    return ApiKey(key_id, name, tuple(scopes.split()), created_at, revoked_at)


# -- functions run on the writer thread -----------------------------------------------------


def _use(link: Reconnecting, fn: Callable[..., T], *args: Any) -> T:
    conn = link.current()
    try:
        result = fn(conn, *args)
    except sqlite3.Error as exc:
        link.failed(exc)
        raise
    link.succeeded()
    return result


def _claim_follows(
    conn: sqlite3.Connection, owner: str, now: float, lease_until: float, limit: int
) -> list[Any]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "UPDATE follows SET owner = ?, lease_until = ? WHERE rowid IN ("
            f" SELECT rowid FROM follows WHERE state IN {ACTIVE_FOLLOW_STATES}"
            " AND (owner = ? OR owner IS NULL OR lease_until < ?) LIMIT ?)",
            (owner, lease_until, owner, now, limit),
        )
        rows = conn.execute(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE owner = ?"
            f" AND state IN {ACTIVE_FOLLOW_STATES} AND lease_until >= ?",
            (owner, lease_until),
        ).fetchall()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rows


def _execute_write(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
    return conn.execute(sql, params).rowcount


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


async def _probe(writer: _BatchChannel) -> StoreUnavailable | None:
    try:
        await writer.probe()
    except StoreUnavailable as exc:
        return exc
    except Exception as exc:
        return StoreUnavailable(f"the store cannot write: {exc}")
    return None


def _migrate(conn: sqlite3.Connection) -> list[int]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, sql in migrations():
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, format_time(utcnow())),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied
