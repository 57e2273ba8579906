"""The cluster store: PostgreSQL through an asyncpg pool, shared by several relays.

Ingests are batched per instance (`base.GroupCommit`); each batch is derived and written
in one transaction by the instance's writer (`postgres_writer`: how the rows are written
and why change ids become visible in id order across instances), in a writer process of
its own by default. Reads, API keys, follows and retention use the pool here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import structlog

from relay.changes import Commit
from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.logs import RepeatedWarnings
from relay.normalize import decoder
from relay.store import ApiKey, IngestRecord, IngestResult, StoreUnavailable
from relay.store.base import GroupCommit
from relay.store.derive import Thresholds
from relay.store.postgres_follows import PostgresFollows
from relay.store.postgres_migrate import migrate_connection
from relay.store.postgres_retention import prune_batch
from relay.store.postgres_writer import SERVER_SETTINGS, PostgresBatchWriter, postgres_config
from relay.store.postgres_writer import unavailable as postgres_unavailable
from relay.store.retention import NOTHING, Pruned, run_pruning
from relay.store.writer_process import WriterProcess

log = structlog.get_logger("relay.store")

# Batches written at once. On the relay's loop, two: one derives while the other waits on
# PostgreSQL. To the writer process, one: it writes one batch at a time anyway, and the
# next batch gathers meanwhile (larger batches, less work per event: measured 2,950 to
# 3,000 events/s against 2,800 to 2,870 with two, and two instances 3,020 to 3,170
# against 2,770 to 2,810).
_IN_FLIGHT = {"thread": 2, "process": 1}
_PROBE_SECONDS = 1.0
_FIRST_KEY_LOCK = 0x72656C62  # held while an instance adds the first API key
_WRITER_MODULE = "relay.store.postgres_writer"


class PostgresStore(PostgresFollows):
    def __init__(
        self,
        settings: StoreSettings,
        providers: Mapping[str, str],
        alerts: AlertSettings,
        retention: RetentionSettings | None = None,
        pool_size: int = 8,
        in_flight: int | None = None,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._providers = dict(providers)
        self._decode = decoder(providers)
        self._thresholds = Thresholds(alerts.turn_stall_seconds, alerts.ready_timeout_seconds)
        self._pool_size = pool_size
        self._in_flight = in_flight or _IN_FLIGHT[settings.writer]
        self._listeners: list[Callable[[Commit], None]] = []
        self._commits: GroupCommit | None = None
        self._writer: PostgresBatchWriter | WriterProcess | None = None
        self._writable_until = 0.0
        self._closing = False
        self._retention = retention
        self._prune_task: asyncio.Task[None] | None = None
        self._repeated = RepeatedWarnings()

    @property
    def turn_rows_read(self) -> int:
        """Turn rows decoded into entries (a measure of a miss), where the writer runs on
        the relay's loop (`store.writer = "thread"`)."""
        return self._writer.turn_rows_read if isinstance(self._writer, PostgresBatchWriter) else 0

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
        self._writer = self._make_writer()
        self._commits = GroupCommit(
            self._writer.write,
            self.list_changes,
            postgres_unavailable,
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

    def _make_writer(self) -> PostgresBatchWriter | WriterProcess:
        """The instance's writer: in a process of its own, or on this loop (then with
        several batches in flight, each holding its first change id until delivered)."""
        settings = self._settings
        if settings.writer == "process":
            config = postgres_config(
                settings.url,
                settings.timeout_seconds,
                settings.cache_bytes,
                self._thresholds,
                self._providers,
            )
            return WriterProcess(config, _WRITER_MODULE)

        def hold(first: int) -> None:
            if self._commits is not None:
                self._commits.hold(first)

        def release(first: int) -> None:
            if self._commits is not None:
                self._commits.release(first)

        pool = self._connected()
        return PostgresBatchWriter(
            pool.acquire,
            self._thresholds,
            settings.cache_bytes,
            hold,
            release,
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
        if isinstance(self._writer, WriterProcess):
            await self._writer.close()
        self._writer = None
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
        if isinstance(self._writer, PostgresBatchWriter):
            # (a writer process finds the pruned sessions' rows new by their versions)
            self._writer.forget(pruned.sessions)
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

    async def fire_due_alerts(self, now: float) -> int:
        """Fire what is due (see `PostgresBatchWriter.fire_due_alerts`), but nothing an
        event still being written may end."""
        commits, writer = self._commits, self._writer
        if self._closing or commits is None or writer is None:
            return 0
        try:
            commit = await writer.fire_due_alerts(commits.oldest_unwritten(now))
        except Exception as exc:
            unavailable = postgres_unavailable(exc)
            if unavailable is not None:
                raise unavailable from exc
            raise
        await commits.deliver(commit)
        return len(commit.changes)

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
