"""Store hardening: poison input, writer recovery, single instance, retention, URLs."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from relay.appkeys import STORE
from relay.logs import RepeatedWarnings
from relay.timefmt import format_unix
from tests.conftest import Relay, RelayFactory, fixture_events
from tests.receivers import FAST_DELIVERY, eventually, receiver, subscribe, until
from tests.test_cli import relay as run_cli
from tests.test_ingest import post, signed
from tests.test_sse import frames


def nested_event(depth: int, newline: bool) -> bytes:
    """A valid fixture event whose `data` holds lists nested `depth` levels deep."""
    event: dict[str, Any] = dict(fixture_events()[0])
    event["id"] = f"evt_deep_{depth}_{newline}"
    event["data"] = {**event.get("data", {}), "deep": "DEEP"}
    body = orjson.dumps(event, option=orjson.OPT_INDENT_2 if newline else None)
    deep = b"[" * (depth - 2) + b"\n" + b"]" * (depth - 2)  # inside the object and `data`
    return body.replace(b'"DEEP"', deep)


async def test_deeply_nested_event_is_a_400_not_a_retryable_503(relay: Relay) -> None:
    """An event nested 300 levels deep with line breaks is refused with 400 on every try."""
    body = nested_event(300, newline=True)
    for _ in range(2):
        status, answer = await post(relay, body, signed(body))
        assert status == 400, answer
        assert answer["error"]["code"] == "INVALID_JSON"
        assert "nested deeper than" in answer["error"]["message"]
    assert await relay.events() == []


async def test_moderately_nested_event_is_stored(relay: Relay) -> None:
    """An event nested 200 levels deep with line breaks is stored."""
    body = nested_event(200, newline=True)
    status, answer = await post(relay, body, signed(body))
    assert status == 202, answer


async def test_unavailable_store_answers_without_internal_detail(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """A 503 from ingest and /readyz says to retry and names no internal error."""
    relay = await start_relay(
        store={"url": f"sqlite:///{tmp_path}/relay.db", "busy_timeout_ms": 50}
    )
    blocker = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        body = orjson.dumps(fixture_events()[0])
        status, answer = await post(relay, body, signed(body))
        ready = await relay.client.get("/readyz")
        readiness = await ready.json()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (status, ready.status) == (503, 503)
    for error in (answer["error"], readiness["error"]):
        assert error["code"] == "STORE_UNAVAILABLE"
        assert "retry" in error["message"]
        assert "locked" not in error["message"]


NUMERIC_HOSTS = [
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://127.1/",
    "http://0x7f000001/",
    "https://hooks.example.123/",
]


async def test_numeric_host_forms_are_refused_at_creation(start_relay: RelayFactory) -> None:
    """A subscription URL whose host is an integer, octal, hex or short IPv4 form is a 400."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    for url in NUMERIC_HOSTS:
        resp = await relay.client.post("/v1/subscriptions", json={"url": url}, headers=relay.auth)
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (400, "INVALID_REQUEST"), url
        assert "four decimal numbers" in error["message"]
    for url in ("http://127.0.0.1:9/hook", "https://hooks.example.com/", "http://[::1]/x"):
        resp = await relay.client.post("/v1/subscriptions", json={"url": url}, headers=relay.auth)
        assert resp.status == 201, url
    resp = await relay.client.patch(
        "/v1/subscriptions/" + (await resp.json())["id"],
        json={"url": "http://127.1/"},
        headers=relay.auth,
    )
    assert resp.status == 400


def test_cli_refuses_numeric_host(tmp_path: Path) -> None:
    """`relay subscriptions add` refuses an integer host in one line, creating nothing."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/cli.db"\n')
    run_cli(config, "migrate")
    added = run_cli(config, "subscriptions", "add", "http://2130706433/", check=False)
    assert added.returncode != 0
    assert "four decimal numbers" in added.stderr
    assert len(added.stderr.strip().splitlines()) == 1
    assert "no subscriptions" in run_cli(config, "subscriptions", "list").stdout


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make files immutable (`chattr +i`), which refuses writes even to root."""
    names = [str(p) for p in paths]
    made = subprocess.run(["chattr", "+i", *names], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *names], check=True)


def unique_event(n: int) -> bytes:
    event = dict(fixture_events()[0])
    event["id"] = f"evt_unique_{n}"
    return orjson.dumps(event)


@pytest.mark.parametrize("writer", ["process", "thread"])
@pytest.mark.parametrize("first_write_before", [True, False])
async def test_writer_recovers_once_the_file_is_writable_again(
    start_relay: RelayFactory, tmp_path: Path, writer: str, first_write_before: bool
) -> None:
    """While the database file refuses writes, ingest and /readyz are 503; after, both recover."""
    relay = await start_relay(store={"url": f"sqlite:///{tmp_path}/relay.db", "writer": writer})
    if first_write_before:
        body = unique_event(0)
        assert (await post(relay, body, signed(body)))[0] == 202
    with immutable(tmp_path / "relay.db", tmp_path / "relay.db-wal"):
        body = unique_event(1)
        status, answer = await post(relay, body, signed(body))
        assert (status, answer["error"]["code"]) == (503, "STORE_UNAVAILABLE")

        async def not_ready() -> bool:
            return (await relay.client.get("/readyz")).status == 503

        await until(not_ready)
    stored: list[int] = []

    async def accepted() -> bool:
        body = unique_event(2)
        status, _ = await post(relay, body, signed(body))
        stored.append(status)
        return status in (200, 202)

    await until(accepted)

    async def ready() -> bool:
        return (await relay.client.get("/readyz")).status == 200

    await until(ready)
    assert [e["id"] for e in await relay.events()][-1] == "evt_unique_2"


def test_repeated_warnings_are_said_once_per_interval_with_a_count() -> None:
    """An identical warning passes once per interval and then tells how many were held back."""
    now = [0.0]
    repeated = RepeatedWarnings(interval=30.0, clock=lambda: now[0])
    assert repeated.admit("disk full") == 0
    held = []
    for _ in range(120):  # every 250 ms for 30 s
        now[0] += 0.25
        held.append(repeated.admit("disk full"))
    said = [count for count in held if count is not None]
    assert said == [119]
    assert repeated.admit("another fault") == 0


async def test_lasting_write_fault_logs_each_warning_once(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """While every write fails for a second and more, each kind of warning is logged once."""
    relay = await start_relay()
    body = unique_event(0)
    assert (await post(relay, body, signed(body)))[0] == 202
    with (
        capture_logs() as logs,
        immutable(tmp_path / "relay.db", tmp_path / "relay.db-wal"),
    ):
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # checkpoints run every 200 ms meanwhile
            body = unique_event(1)
            assert (await post(relay, body, signed(body)))[0] == 503
            assert (await relay.client.get("/readyz")).status == 503
    warnings = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    for event in ("store.checkpoint_failed", "ingest.store_unavailable", "store.not_writable"):
        assert warnings.count(event) == 1, warnings


def store_config(tmp_path: Path) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nport = 0\n[store]\nurl = "sqlite:///{tmp_path}/data/t.db"\n')
    return config


def test_second_relay_on_one_store_refuses_to_start(tmp_path: Path) -> None:
    """A second `relay serve` on a store that one already serves exits 1 naming the store."""
    config = store_config(tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(60, first.kill)  # bounds the read below if nothing comes
    watchdog.start()
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if "listening on" in line:
                break
        second = run_cli(config, "serve", check=False)
        assert first.poll() is None  # the first one still serves
    finally:
        watchdog.cancel()
        first.send_signal(signal.SIGTERM)
        try:
            first.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate()
    assert second.returncode == 1
    assert "listening" not in second.stdout
    message = second.stderr.strip().splitlines()
    assert len(message) == 1, second.stderr
    assert "already" in message[0]
    assert str(tmp_path / "data" / "t.db") in message[0]
    assert first.returncode == 0
    restarted = run_cli(config, "keys", "list")  # the lock does not bar admin commands
    assert restarted.returncode == 0


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["keys", "create", "--scope", "agent:read"],
        ["keys", "revoke", "key_x"],
        ["subscriptions", "list"],
        ["subscriptions", "remove", "sub_x"],
        ["check-state"],
    ],
)
def test_admin_commands_refuse_a_store_that_does_not_exist(
    tmp_path: Path, command: list[str]
) -> None:
    """An admin command on a missing store exits 1 with one line naming it, creating nothing."""
    config = store_config(tmp_path)
    done = run_cli(config, *command, check=False)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(tmp_path / "data" / "t.db") in lines[0]
    assert "relay migrate" in lines[0]
    assert not (tmp_path / "data").exists()


def test_migrate_creates_the_store_admin_commands_then_use(tmp_path: Path) -> None:
    """`relay migrate` creates a missing store; `relay keys list` then reports no keys."""
    config = store_config(tmp_path)
    assert run_cli(config, "migrate").returncode == 0
    assert "no API keys" in run_cli(config, "keys", "list").stdout


def session_events(session: int) -> list[bytes]:
    """A session created, provisioned and ready: three events, several changes."""
    kinds = ["agent.chat.session.created", "agent.runtime.reused", "agent.worker.ready"]
    return [
        orjson.dumps(
            {
                "id": f"evt_ret_{session:05d}_{n}",
                "type": kind,
                "occurred_at": "2026-11-20T09:00:00.000Z",
                "data": {"chatId": f"chat_ret_{session:05d}"},
            }
        )
        for n, kind in enumerate(kinds)
    ]


async def ingest_session(relay: Relay, session: int) -> None:
    for body in session_events(session):
        assert (await post(relay, body, signed(body)))[0] == 202


def count(db: Path, sql: str, *params: object) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


# Events of sessions that have had no event for a while: a live session keeps them all.
QUIET_SESSIONS_EVENTS = """
SELECT count(*) FROM events e
WHERE (SELECT max(received_at) FROM events l WHERE l.session_id = e.session_id) < ?
"""


async def test_rows_stay_bounded_under_steady_ingest(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """With a one-second retention, no session quiet for 2.5 seconds keeps an event while
    ingest goes on, so the store holds no more than the last 2.5 seconds' sessions."""
    relay = await start_relay(
        retention={"seconds": 1.0, "interval_seconds": 0.1, "batch_rows": 200}
    )
    # Ready means the writer process (started on first use) commits: its start, seconds on
    # a loaded machine, would otherwise hold up the first ingests, and a session whose
    # events straddle it stays live (all its events kept) for as long.
    await until(relay.ready)
    db = tmp_path / "relay.db"
    kept = 2.5
    started = time.monotonic()
    session = 0
    acknowledged: list[float] = []  # when each session's last event was answered
    samples: list[tuple[int, int, int, int, int]] = []
    while time.monotonic() - started < 5.0:
        await ingest_session(relay, session)
        acknowledged.append(time.monotonic())
        session += 1
        if time.monotonic() - started > 3.0:  # by now every second of ingest was pruned once
            sampled = time.monotonic()
            old = format_unix(time.time() - kept)
            recent = sum(1 for at in acknowledged if at > sampled - kept - 0.5)
            samples.append(
                (
                    count(db, QUIET_SESSIONS_EVENTS, old),
                    count(db, "SELECT count(*) FROM events"),
                    count(db, "SELECT count(*) FROM changes"),
                    count(db, "SELECT count(*) FROM sessions"),
                    recent * len(session_events(0)),
                )
            )
    assert samples, "ingest was too slow to sample"
    assert all(old == 0 for old, *_ in samples), samples
    for _, events, changes, sessions, recent_events in samples:
        assert events <= recent_events, samples
        assert changes <= 3 * events + 3
        assert sessions <= events
    assert samples[-1][1] < session * len(session_events(0))


async def test_resume_from_a_pruned_change_gets_stream_reset(start_relay: RelayFactory) -> None:
    """A resume from a change id that was pruned gets stream.reset, then the oldest kept change."""
    relay = await start_relay(
        retention={"seconds": 0.5, "interval_seconds": 0.05, "batch_rows": 100}
    )
    await resume_from_a_pruned_id_resets(relay)


async def resume_from_a_pruned_id_resets(relay: Relay) -> None:
    """Ingest until the first session's changes are pruned, then resume a stream from the
    first of them: stream.reset with the oldest kept id, then a change from there on."""
    await ingest_session(relay, 0)
    first = await relay.client.get("/v1/changes", params={"after": 0}, headers=relay.auth)
    first_ids = [item["id"] for item in (await first.json())["items"]]
    later = [1]

    async def pruned() -> bool:
        later[0] += 1
        await ingest_session(relay, later[0])
        resp = await relay.client.get(
            "/v1/changes", params={"after": 0, "limit": 1}, headers=relay.auth
        )
        return bool((await resp.json())["items"][0]["id"] > max(first_ids))

    await until(pruned)
    resp = await relay.client.get(
        "/v1/stream",
        headers={**relay.auth, "Last-Event-ID": str(first_ids[0])},
        timeout=aiohttp.ClientTimeout(total=10),
    )
    got: list[dict[str, str]] = []
    async for frame in frames(resp):
        if "data" in frame:
            got.append(frame)
            if len(got) == 2:
                break
    resp.close()
    reset, change = got
    assert reset["event"] == "stream.reset"
    oldest = orjson.loads(reset["data"])["oldest_id"]
    assert oldest > max(first_ids)
    assert int(change["id"]) >= oldest  # the oldest kept change the stream's filter takes


async def test_retention_keeps_live_sessions_and_prunes_quiet_ones(
    start_relay: RelayFactory,
) -> None:
    """A session with recent activity keeps its state and events; a quiet one is pruned."""
    relay = await start_relay(
        retention={"seconds": 1.0, "interval_seconds": 0.05, "batch_rows": 100}
    )
    await ingest_session(relay, 0)  # stays live: it gets a turn now and then
    await ingest_session(relay, 1)  # goes quiet
    turns = [0]

    async def quiet_one_pruned() -> bool:
        turns[0] += 1
        for kind in ("agent.chat.turn.started", "agent.chat.turn.completed"):
            body = orjson.dumps(
                {
                    "id": f"evt_live_{turns[0]}_{kind}",
                    "type": kind,
                    "occurred_at": "2026-11-20T09:00:01.000Z",
                    "data": {"chatId": "chat_ret_00000", "turnId": f"turn_{turns[0]:03d}"},
                }
            )
            assert (await post(relay, body, signed(body)))[0] == 202
        resp = await relay.client.get("/v1/sessions/chat_ret_00001", headers=relay.auth)
        return resp.status == 404

    await until(quiet_one_pruned)
    resp = await relay.client.get("/v1/sessions/chat_ret_00000", headers=relay.auth)
    live = await resp.json()
    assert live["readiness"] == "ready"
    resp = await relay.client.get("/v1/sessions/chat_ret_00000/events", headers=relay.auth)
    assert (await resp.json())["items"][0]["id"] == "evt_ret_00000_0"
    assert await relay.client.app[STORE].check_derived_state() == []


async def test_retention_prunes_finished_deliveries_and_attempts(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """Deliveries made and their attempts are pruned once older than the retention."""
    relay = await start_relay(
        delivery=FAST_DELIVERY,
        retention={"seconds": 1.0, "interval_seconds": 0.05, "batch_rows": 100},
    )
    db = tmp_path / "relay.db"
    async with receiver() as got:
        await subscribe(relay, got, "/hook", types=["session.*"])
        await ingest_session(relay, 0)
        await eventually(lambda: len(got.at("/hook")) >= 3)
        assert count(db, "SELECT count(*) FROM delivery_attempts") >= 3
        later = [0]

        async def pruned() -> bool:
            later[0] += 1
            await ingest_session(relay, later[0])  # keeps deliveries (and time) going
            old = time.time() - 2.0
            return (
                count(db, "SELECT count(*) FROM deliveries WHERE session_id = 'chat_ret_00000'")
                == 0
                and count(db, "SELECT count(*) FROM delivery_attempts WHERE at < ?", old) == 0
            )

        await until(pruned)
