"""The embedded store: one SQLite file in WAL mode.

Writes go through one writer: concurrent ingests queue up while a batch is being
committed and are then written together in a single transaction (group commit). Each
request is answered only after the commit of its batch. The writer owns a stdlib
`sqlite3` connection on one dedicated thread, so a whole batch costs one thread hop
rather than one per statement; reads use a separate aiosqlite connection.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from relay.config import StoreSettings
from relay.store import ApiKey, IngestRecord, IngestResult, StoredEvent, StoreUnavailable
from relay.timefmt import format_time, utcnow

T = TypeVar("T")
log = structlog.get_logger("relay.store")

_INSERT_EVENTS = (
    "INSERT INTO events"
    " (seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload)"
    " VALUES "
)
_EVENT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
# One multi-row statement per chunk: each sqlite3 call releases and re-takes the GIL, and
# re-taking it from a busy event loop is what costs, so a batch makes as few calls as it can.
_INSERT_CHUNK = 512
_LOOKUP_CHUNK = 512
_EVENT_COLUMNS = (
    "seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload"
)

_Pending = tuple[IngestRecord, "asyncio.Future[IngestResult]"]


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


class SQLiteStore:
    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._path = sqlite_path(settings.url)
        self._executor = _writer_thread()
        self._writer: sqlite3.Connection | None = None
        self._batch_writer: _BatchWriter | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        if self._writer is not None and self._writer_task is not None:
            return
        self._closing = False
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._in_writer(self._connect_writer)
        if self._settings.auto_migrate:
            await self.migrate()
        self._batch_writer = _BatchWriter(self._writer)
        self._reader = await aiosqlite.connect(self._path)
        await self._reader.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_ms)}")
        self._writer_task = asyncio.create_task(self._write_loop(), name="relay-sqlite-writer")

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._writer_task is not None:
            await self._writer_task
            self._writer_task = None
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

    async def migrate(self) -> list[int]:
        if self._writer is None:
            self._writer = await self._in_writer(self._connect_writer)
        return await self._in_writer(_migrate, self._writer)

    # -- ingest: group commit ----------------------------------------------------------

    async def ingest(self, record: IngestRecord) -> IngestResult:
        if self._closing or self._writer_task is None or self._writer_task.done():
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        writer = self._batch_writer
        assert writer is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                count = min(len(self._pending), self._settings.batch_max)
                batch = [self._pending.popleft() for _ in range(count)]
                try:
                    results = await self._in_writer(writer.write, batch)
                except Exception as exc:
                    if not isinstance(exc, sqlite3.Error):
                        log.exception("store.batch_failed")
                    error = StoreUnavailable(f"the store cannot write: {exc}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            if self._closing:
                return

    async def check_writable(self) -> None:
        if self._closing or self._writer is None:
            raise StoreUnavailable("the store is closed")
        try:
            await self._in_writer(_probe_write, self._writer)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store cannot write: {exc}") from exc

    # -- reads ---------------------------------------------------------------------------

    async def list_events(self, after: int, limit: int) -> list[StoredEvent]:
        rows = await self._read(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [StoredEvent(*row) for row in rows]

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    # -- API keys --------------------------------------------------------------------------

    async def add_api_key(self, key: ApiKey, key_hash: str) -> None:
        await self._write(
            "INSERT INTO api_keys (id, name, key_hash, scopes, created_at) VALUES (?, ?, ?, ?, ?)",
            (key.id, key.name, key_hash, " ".join(key.scopes), key.created_at),
        )

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
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return await self._in_writer(_execute_write, self._writer, sql, params)


def _writer_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite-writer")


def _api_key(row: Any) -> ApiKey:
    key_id, name, scopes, created_at, revoked_at = row
    return ApiKey(key_id, name, tuple(scopes.split()), created_at, revoked_at)


# -- functions run on the writer thread -----------------------------------------------------


class _BatchWriter:
    """Writes batches of events; runs only on the writer thread.

    The common batch holds only new events: it is one multi-row INSERT with seqs counted
    on from the last one written. When fewer rows land than were sent (an event already
    stored, or another process wrote meanwhile), the batch is rolled back and written
    again after looking up which events exist.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.last_seq: int | None = None

    def write(self, batch: list[_Pending]) -> list[IngestResult]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self.last_seq is None:
                self.last_seq = _max_seq(conn)
            results, rows, last = _plan(batch, {}, self.last_seq)
            before = conn.total_changes
            _insert(conn, rows)
            if conn.total_changes - before != len(rows) // _ROW_WIDTH:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                keys = [(record.event.source, record.event.id) for record, _ in batch]
                results, rows, last = _plan(batch, _existing_seqs(conn, keys), _max_seq(conn))
                _insert(conn, rows)
            conn.execute("COMMIT")
        except BaseException:
            self.last_seq = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.last_seq = last
        return results


_ROW_WIDTH = 9


def _plan(
    batch: list[_Pending], seqs: dict[tuple[str, str], int], last_seq: int
) -> tuple[list[IngestResult], list[Any], int]:
    """Assign seqs: known events (and repeats within the batch) keep theirs."""
    results = []
    rows: list[Any] = []
    for record, _ in batch:
        event = record.event
        key = (event.source, event.id)
        seq = seqs.get(key)
        if seq is not None:
            results.append(IngestResult(seq, True))
            continue
        last_seq += 1
        seqs[key] = last_seq
        results.append(IngestResult(last_seq, False))
        rows += (
            last_seq,
            event.source,
            event.id,
            event.type,
            event.session_id,
            event.turn_id,
            format_time(event.occurred_at),
            format_time(record.received_at),
            record.body,
        )
    return results, rows, last_seq


def _insert(conn: sqlite3.Connection, rows: list[Any]) -> None:
    step = _INSERT_CHUNK * _ROW_WIDTH
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        values = ",".join([_EVENT_ROW] * (len(chunk) // _ROW_WIDTH))
        conn.execute(_INSERT_EVENTS + values + " ON CONFLICT DO NOTHING", chunk)


def _existing_seqs(
    conn: sqlite3.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Seqs of the events among `keys` that are already stored."""
    by_source: dict[str, list[str]] = {}
    for source, event_id in keys:
        by_source.setdefault(source, []).append(event_id)
    found: dict[tuple[str, str], int] = {}
    for source, ids in by_source.items():
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, seq FROM events WHERE source = ? AND event_id IN ({marks})"
            for event_id, seq in conn.execute(sql, [source, *chunk]):
                found[(source, event_id)] = seq
    return found


def _max_seq(conn: sqlite3.Connection) -> int:
    (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
    return int(seq)


def _execute_write(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
    return conn.execute(sql, params).rowcount


def _probe_write(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")


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
