"""A PostgreSQL store's typed change pages, session pages and a session's changes are
read through indexes, and its writer's statements are planned once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from itertools import product

import asyncpg
import pytest

from relay.changes import glob_pattern
from relay.config import AlertSettings, StoreSettings
from relay.store import SessionQuery
from relay.store.derive import Thresholds
from relay.store.postgres import PostgresStore
from relay.store.postgres_reads import (
    _SESSION_CHANGE_PAGE,
    _SESSION_PAGE,
    _TYPED_CHANGE_PAGE,
    CHANGE_TYPES,
    session_page_args,
)
from relay.store.postgres_writer import PostgresBatchWriter, _Link
from tests.test_store_contract import lifecycle, rec

ROWS = 20_000


@pytest.fixture
async def filled(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A migrated store whose tables hold enough rows for the planner to prefer indexes."""
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO events (seq, source, event_id, type, session_id, occurred_at,"
            " received_at, payload) SELECT g, 'src', 'ev' || g, 'turn.started',"
            " 'chat_' || (g % 2000), '', '', '\\x'::bytea FROM generate_series(1, $1) g",
            ROWS,
        )
        await conn.execute(
            "INSERT INTO changes (id, type, session_id, event_seq, body)"
            " SELECT g, 'type.' || (g % 7), 'chat_' || (g % 2000), g, 'x'::bytea"
            " FROM generate_series(1, $1) g",
            ROWS,
        )
        await conn.execute(
            "INSERT INTO sessions (session_id, version, readiness, turn_status, activity_seq,"
            " snapshot) SELECT 'chat_' || (g % 2000), 1,"
            " CASE WHEN g % 2000 < 1900 THEN 'ready' ELSE 'provisioning' END,"
            " CASE WHEN g % 2000 % 10 = 0 THEN 'running' ELSE 'idle' END, max(g), 'x'::bytea"
            " FROM generate_series(1, $1) g GROUP BY g % 2000",
            ROWS,
        )
        await conn.execute(  # alerts: changes no event caused
            "INSERT INTO changes (id, type, session_id, event_seq, body)"
            " SELECT $1 + g, 'type.' || (g % 7), 'chat_' || (g % 2000), NULL, 'x'::bytea"
            " FROM generate_series(1, 200) g",
            ROWS,
        )
        await conn.execute("ANALYZE")
        yield conn
    finally:
        await conn.close()


async def plan(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(row[0] for row in rows)


def literal(value: object) -> str:
    """`value` as SQL (EXECUTE takes no bound parameters)."""
    if isinstance(value, list):
        return f"ARRAY[{', '.join(map(literal, value))}]::text[]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def no_seq_scan(text: str) -> None:
    for table in ("changes", "sessions", "events"):
        assert f"Seq Scan on {table}" not in text, text


async def test_a_typed_change_page_reads_each_type_through_its_index(
    filled: asyncpg.Connection,
) -> None:
    """A page of changes of a type that never occurs uses changes_by_type, not a scan."""
    text = await plan(filled, _TYPED_CHANGE_PAGE, 0, ["never.happens", "type.3"], 50)
    assert "changes_by_type" in text, text
    no_seq_scan(text)


async def test_the_types_in_the_log_are_found_by_a_loose_index_scan(
    filled: asyncpg.Connection,
) -> None:
    """The distinct types come from seeks in changes_by_type, and are all found."""
    text = await plan(filled, CHANGE_TYPES)
    assert "changes_by_type" in text, text
    no_seq_scan(text)
    found = [row[0] for row in await filled.fetch(CHANGE_TYPES)]
    assert found == [f"type.{n}" for n in range(7)]


FILTERS = [(None, None), ("ready", None), (None, "running"), ("provisioning", "idle")]
CURSORS = [(ROWS, None), (ROWS - 500, (ROWS - 900, "chat_0"))]


@pytest.mark.parametrize("generic", [False, True])
async def test_a_sessions_page_reads_the_status_index(
    filled: asyncpg.Connection, generic: bool
) -> None:
    """A sessions page, first or later, as of now or earlier, with or without filters,
    and whether the plan knows the parameters or not, reads sessions_by_status in
    activity order, never the whole table."""
    if generic:
        await filled.execute("SET plan_cache_mode = force_generic_plan")
        await filled.execute(f"PREPARE page AS {_SESSION_PAGE}")
    for (readiness, turn_status), (as_of, after) in product(FILTERS, CURSORS):
        args = session_page_args(SessionQuery(as_of, after, 50, readiness, turn_status))
        if generic:
            text = await plan(filled, f"EXECUTE page ({', '.join(map(literal, args))})")
            assert "$2" in text, text  # a generic plan: the parameters are not in it
        else:
            text = await plan(filled, _SESSION_PAGE, *args)
        scan = text.split("Index Scan Backward using sessions_by_status", 1)
        assert len(scan) == 2, text  # each pair's range, read in activity order
        condition = scan[1].split("Index Cond: ", 1)[1].split("\n", 1)[0]
        assert "readiness =" in condition, text
        assert "turn_status =" in condition, text
        no_seq_scan(text)


async def test_a_sessions_changes_are_read_through_its_events_and_alerts(
    filled: asyncpg.Connection,
) -> None:
    """A session's changes come from its events' changes and its alert changes, each read
    through an index; nothing scans the log."""
    text = await plan(filled, _SESSION_CHANGE_PAGE, "chat_7", 0, ["raw.%"], 500)
    for index in ("events_by_session", "changes_by_event", "alert_changes_by_session"):
        assert index in text, text
    assert "Index Cond: (id >" not in text, text  # the log is not read from the id on
    no_seq_scan(text)


async def test_typed_pages_equal_the_filtered_log(pg_url: str) -> None:
    """Exact names, globs and raw types read by type give the log's changes of those types."""
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    try:
        for raw in lifecycle("chat_a", 3) + lifecycle("chat_b", 2):
            await store.ingest(rec(raw))
        log = await store.list_changes(0, 1000, exclude=())
        raw_type = next(c.type for c in log if c.type.startswith("raw."))
        cases = {("turn.completed", raw_type): 2, ("raw.*", "session.*"): 2, ("no.*",): 0}
        for types, kinds in cases.items():
            pattern = glob_pattern(types)
            wanted = [c for c in log if pattern.fullmatch(c.type)]
            assert len({c.type for c in wanted}) >= kinds, types
            for limit in (3, 1000):
                page = await store.list_changes(0, limit, types)
                assert page == wanted[:limit], types
            if wanted:
                rest = await store.list_changes(wanted[0].id, 1000, types)
                assert rest == wanted[1:], types
    finally:
        await store.close()


async def test_ingest_on_a_new_database_scans_no_table_as_it_grows(pg_url: str) -> None:
    """Before autovacuum first analyzes a new database's tables, the plans an ingest
    statement caches while its tables are small must not scan them as they grow: every
    batch of a new deployment's first minutes would read the whole events table."""
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    try:
        for n in range(40):  # one batch each: past the five runs before a generic plan
            await store.ingest_many([rec(raw) for raw in lifecycle(f"chat_{n}", 3)])
    finally:
        await store.close()  # its connections end, and their statistics are written
    conn = await asyncpg.connect(pg_url)
    try:
        counts: dict[str, tuple[int, int]] = {}
        for _ in range(100):  # a backend writes its statistics as it exits
            rows = await conn.fetch(
                "SELECT relname, seq_tup_read, coalesce(idx_scan, 0) FROM pg_stat_user_tables"
                " WHERE relname IN ('events', 'alerts', 'sessions', 'turns', 'session_facts')"
            )
            counts = {name: (seq, idx) for name, seq, idx in rows}
            if counts.get("events", (0, 0))[1] >= 40:
                break
            await asyncio.sleep(0.1)
        assert counts["events"][1] >= 40, counts  # each batch looked its events up
        # (tables scanned while empty, as indexes were made, read no row)
        assert {name: rows for name, (rows, _) in counts.items() if rows} == {}, counts
    finally:
        await conn.close()


async def test_the_writer_process_plans_its_statements_once(pg_url: str) -> None:
    """On the writer process's connection every statement runs on its generic plan: none
    is planned again for each batch (the one taking ids was, every time, before)."""
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    await store.close()
    link = _Link(pg_url, 10)
    writer = PostgresBatchWriter(link.acquire, Thresholds(600, 120), 1 << 20)
    try:
        for n in range(20):
            await writer.write([rec(raw) for raw in lifecycle(f"chat_{n}", 3)])
        async with link.acquire() as conn:
            plans = await conn.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%counters%' OR statement LIKE '%session_facts%'"
            )
        assert len(plans) >= 2  # the statements taking ids and locking sessions
        assert {row["statement"][:60]: row["custom_plans"] for row in plans if row[2]} == {}
        assert all(row["generic_plans"] > 0 for row in plans)
    finally:
        await link.close()
