"""Ingest batches and due alerts written to PostgreSQL, by one instance's writer.

`PostgresStore` runs it in a writer process of its own (`main`; the default,
`store.writer = "process"`), as the SQLite store does, or on its own event loop
(`store.writer = "thread"`). In its own process the writer's Python (normalising again,
deriving, encoding the rows) runs beside the relay's request handling instead of
taking turns with it on one event loop: on 2 cores, where the relay's loop was the
bottleneck of PostgreSQL ingest, this is what lets one instance keep up with SQLite.

Each batch (`base.GroupCommit` gathers them) is derived and written in one transaction,
in few round trips, the same whether or not another instance changed its sessions:

1. one statement (`postgres_entries.lock_and_read`) locks the facts rows of the batch's
   sessions (in session id order, so that two instances never wait on each other in a
   cycle), looks up the batch's events already stored and reads what the entries of the
   sessions another instance changed take (their facts, last and running turns, alert
   rows, and the turns of the batch's events); a session's cached entry is used only if
   its row's version is still the one cached;
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
import json
import pickle
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import asyncpg
import orjson

from relay.changes import Commit, StoredChange
from relay.normalize import normaliser_lookup
from relay.packed_bodies import CHANGE, pack, pack_event, unpack
from relay.state import affects_state
from relay.store import IngestRecord, IngestResult, StoreUnavailable
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
from relay.store.postgres_entries import lock_and_read
from relay.timefmt import format_unix
from relay.tuning import run_loop, tune_gc

_RETRIES = 5  # a batch whose events another instance stored meanwhile is run again
_ALERTS_PER_RUN = 500
# No JIT: every statement of the store is short, and compiling one costs far more (tens to
# hundreds of ms, on every run of a statement whose estimate passes `jit_above_cost`).
# No sequential scan where an index serves: every statement of the store reads and writes
# through indexes, but a new database's tables grow long before autovacuum first analyzes
# them, and a plan cached while they were small (a scan: the cheapest then) would be kept
# for every later run, reading the whole events table for each batch (in `make
# bench-cluster` the rate fell by a third within the first minute).
SERVER_SETTINGS = {"jit": "off", "enable_seqscan": "off"}
# The writer process's statements (few, of fixed shapes, taking arrays) are planned once:
# left to choose, PostgreSQL planned the statement that takes ids afresh on every run
# (100 custom plans in 100 batches), in the step where other instances wait for it, and
# on a new database's small tables every statement of the writer.
WRITER_SETTINGS = {**SERVER_SETTINGS, "plan_cache_mode": "force_generic_plan"}

Acquire = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


class _StoredElsewhere(Exception):
    """An event of the batch was stored by another transaction since it was looked up."""


class PostgresBatchWriter:
    """Writes batches and fires due alerts on connections from `acquire`.

    Where batches of one instance are written concurrently (on the relay's loop, with
    two in flight), `hold(first)` is told the first change id a transaction takes as it
    takes it, and `release(first)` if it then ends without a commit (`GroupCommit`);
    one at a time (the writer process) they commit in the order they are answered in.
    """

    def __init__(
        self,
        acquire: Acquire,
        thresholds: Thresholds,
        cache_bytes: int,
        hold: Callable[[int], None] | None = None,
        release: Callable[[int], None] | None = None,
    ) -> None:
        self._acquire = acquire
        self._thresholds = thresholds
        self._cache = EntryCache(cache_bytes)
        self._hold_first = hold
        self._release_first = release
        self.turn_rows_read = 0  # turn rows decoded into entries (a measure of a miss)
        self.sessions_read_again = 0  # changed while their lock waited: read on their own

    def forget(self, sessions: Sequence[str]) -> None:
        """Drop these sessions' cached entries (pruned: their rows are gone)."""
        for session_id in sessions:
            self._cache.pop(session_id)

    async def write(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        for _ in range(_RETRIES):
            held: list[int] = []
            try:
                async with self._acquire() as conn, conn.transaction():
                    derived, changes = await self._write_in(conn, batch, held)
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
        self, conn: asyncpg.Connection, batch: list[IngestRecord], held: list[int]
    ) -> tuple[Derived, list[StoredChange]]:
        sessions = sorted(
            {r.event.session_id for r in batch if r.event.session_id and affects_state(r.event)}
        )
        locked = await lock_and_read(conn, sessions, batch, self._cache.get, self._thresholds)
        self.turn_rows_read += locked.turn_rows_read
        self.sessions_read_again += locked.read_again
        entries = locked.entries
        derived = derive_batch(
            batch, locked.existing, 0, lambda sid: entries.get(sid, NO_SESSION), self._thresholds
        )
        if not (derived.events or derived.changes or derived.sessions or derived.activity):
            return derived, []
        # Packed before the ids are taken: the rows that do not hold one.
        derived = replace(
            derived,
            turns=[(*row[:4], pack(row[4], CHANGE), row[5]) for row in derived.turns],
            events=[(*row[:8], pack_event(row[8])) for row in derived.events],
            sessions=[(*row[:5], pack(row[5], CHANGE)) for row in derived.sessions],
        )
        # From here on, the counter rows stay locked until the commit (and the other
        # instances' batches wait for them): one statement takes the ids, one writes.
        last = await _take(conn, len(derived.events), len(derived.changes))
        derived = derived.shifted(last.get("event_seq", 0) - len(derived.events))
        before = last.get("change_id", 0) - len(derived.changes)
        changes, rows = number_changes(derived.changes, before)
        if changes:
            self._hold(changes[0].id, held)
        inserted = await conn.fetchval(
            _WRITE,
            *_columns(derived.turns, 6),
            *_columns(derived.facts, 4),
            *_columns(derived.alert_deletes, 3),
            *_columns(derived.alert_inserts, 4),
            *_columns(derived.events, 9),
            *_columns(rows, 6),
            *_columns(derived.sessions, 6),
            list(derived.activity),
            list(derived.activity.values()),
        )
        if inserted != len(derived.events):
            raise _StoredElsewhere
        return derived, changes

    def _hold(self, first: int, held: list[int]) -> None:
        if self._hold_first is not None:
            self._hold_first(first)
            held.append(first)

    def _release(self, held: list[int]) -> None:
        if self._release_first is not None:
            for first in held:
                self._release_first(first)

    def _remember(self, entries: dict[str, SessionEntry]) -> None:
        for session_id, entry in entries.items():
            self._cache.put(session_id, entry)

    # -- alerts ----------------------------------------------------------------------------

    async def fire_due_alerts(self, now: float) -> Commit:
        """Fire what is due by `now`, once across instances: a run claims the due rows'
        sessions (their facts rows, `FOR UPDATE SKIP LOCKED`: a session another
        transaction holds waits for the next run), deletes their due rows and writes the
        changes."""
        held: list[int] = []
        try:
            async with self._acquire() as conn, conn.transaction():
                changes, sessions = await _fire(conn, now, lambda first: self._hold(first, held))
        except BaseException:
            self._release(held)
            raise
        self.forget(sessions)  # their facts rows' versions moved: read them again
        return Commit(changes, {})


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


def unavailable(exc: Exception) -> StoreUnavailable | None:
    """What a failure to write means for callers: the store cannot write now, or None
    (a failure of the batch itself)."""
    if isinstance(
        exc, OSError | asyncio.TimeoutError | asyncpg.PostgresError | asyncpg.InterfaceError
    ):
        return StoreUnavailable(f"the store cannot write: {exc}")
    return None


# -- the writer process --------------------------------------------------------------------


def postgres_config(
    url: str,
    timeout_seconds: float,
    cache_bytes: int,
    thresholds: Thresholds,
    providers: Mapping[str, str],
) -> dict[str, Any]:
    """What the PostgreSQL writer process (`main`) is started with."""
    return {
        "url": url,
        "timeout_seconds": timeout_seconds,
        "cache_bytes": cache_bytes,
        "turn_stall_seconds": thresholds.turn_stall_seconds,
        "ready_timeout_seconds": thresholds.ready_timeout_seconds,
        "providers": dict(providers),
    }


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.stdin.read())
    tune_gc()
    run_loop(_serve(fd, config))


async def _serve(fd: int, config: dict[str, Any]) -> None:
    """Answer the relay's requests one at a time, in order, until its socket closes."""
    from relay.store.writer_process import HEADER, plain, wire_records

    link = _Link(config["url"], config["timeout_seconds"])
    providers: dict[str, str] = config["providers"]
    writer = PostgresBatchWriter(
        link.acquire,
        Thresholds(config["turn_stall_seconds"], config["ready_timeout_seconds"]),
        config["cache_bytes"],
    )
    normaliser = normaliser_lookup(providers)

    async def run(op: str, argument: Any) -> tuple[Any, ...]:
        if op == "write":
            results, commit = await writer.write(wire_records(normaliser, argument))
            return ("ok", [tuple(r) for r in results], *plain(commit))
        if op == "alerts":
            return ("ok", *plain(await writer.fire_due_alerts(argument)))
        return ("error", "other", f"unknown request {op!r}")

    async def answer(request: tuple[str, Any]) -> tuple[Any, ...]:
        try:
            return await run(*request)
        except Exception as exc:
            if unavailable(exc) is not None or isinstance(exc, StoreUnavailable):
                return ("error", "unavailable", f"the store cannot write: {exc}")
            return ("error", "other", f"{type(exc).__name__}: {exc}")

    reader, stream = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    try:
        while True:
            try:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                request = pickle.loads(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the relay closed its end: it stops, or it is gone
            reply = pickle.dumps(await answer(request), pickle.HIGHEST_PROTOCOL)
            stream.write(HEADER.pack(len(reply)) + reply)
            await stream.drain()
    finally:
        stream.close()
        await link.close()


class _Link:
    """A connection of the writer process, made again after it failed."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._url,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings=WRITER_SETTINGS,
            )
        try:
            yield self._conn
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            self._conn.terminate()  # in an unknown state: the next batch connects again
            self._conn = None
            raise

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), self._timeout)
            self._conn = None


if __name__ == "__main__":
    main(int(sys.argv[1]))
