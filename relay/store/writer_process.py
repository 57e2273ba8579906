"""The ingest writer in a process of its own.

Per event the writer runs more Python than the request that brought it: it normalises
again, inserts, and derives state and changes. On a thread beside the event loop the
two share one GIL, and every SQLite call that releases the GIL must win it back from a
busy loop, so each waits on the other. In its own process the writer has an interpreter
(and a core) to itself. The loop sends each batch as `(source, raw body, received_at)`
tuples over a socket pair; the writer process normalises, writes and derives in one
transaction with the same `BatchWriter` the thread mode uses, and answers with the
seqs and the committed changes. Requests are pipelined: the next batch can already wait
in the socket while one commits, so the writer process does not idle between batches;
it answers in order, and answers are matched to requests first in, first out.

The writer process ignores SIGINT and SIGTERM and ends when its socket closes, so a
stopping relay can still finish the batch in flight; if the relay dies, the socket
closes and the writer ends after its current transaction.

`WriterProcess` and the framing (a 4-byte length, then a pickle) serve both stores: the
SQLite writer is `main` here, the PostgreSQL one `relay.store.postgres_writer.main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import signal
import socket
import sqlite3
import struct
import sys
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from relay.changes import Commit, StoredChange
from relay.config import AlertSettings, StoreSettings
from relay.normalize import Normaliser, decoder, normaliser_lookup
from relay.store import IngestRecord, IngestResult, StoreUnavailable
from relay.store.reconnect import Reconnecting
from relay.store.retention import Pruned
from relay.tuning import tune_gc

log = structlog.get_logger("relay.store")
HEADER = struct.Struct(">I")  # a request's or an answer's length
Wire = tuple[str, bytes, datetime]  # (source, raw body, received_at)


class WriterFailed(Exception):
    """The writer process could not take a batch for another reason than SQLite's."""


class WriterProcess:
    """The relay's handle on its writer process, started on first use."""

    def __init__(self, config: Mapping[str, Any], module: str = __name__) -> None:
        """`module` runs as the writer process (`python -m`), `config` on its stdin."""
        self._config = json.dumps(dict(config))
        self._module = module
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()  # held while the process starts or stops
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._answers: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The writer process's pid while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def write(self, records: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        wire: list[Wire] = [(r.event.source, r.body, r.received_at) for r in records]
        seqs, changes, versions = await self._call(("write", wire))
        results = [IngestResult(seq, duplicate) for seq, duplicate in seqs]
        return results, _commit(changes, versions)

    async def fire_due_alerts(self, now: float) -> Commit:
        changes, versions = await self._call(("alerts", now))
        return _commit(changes, versions)

    async def probe(self) -> None:
        await self._call(("probe", None))

    async def prune(self, cutoff: float, limit: int) -> Pruned:
        rows, full, sessions = await self._call(("prune", (cutoff, limit)))
        return Pruned(rows, full, tuple(sessions))

    async def close(self) -> None:
        async with self._lock:
            await self._stop()

    def _running(self) -> bool:
        return self._writer is not None and not self._writer.is_closing() and self.pid is not None

    async def _call(self, request: tuple[str, Any]) -> Any:
        if not self._running():
            async with self._lock:
                if not self._running():  # another call may have started it meanwhile
                    await self._stop()  # a writer process that ended is replaced
                    await self._start()
        assert self._writer is not None
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        self._writer.write(HEADER.pack(len(payload)) + payload)
        status, *values = await answer
        if status == "ok":
            return values[0] if len(values) == 1 else values
        kind, message = values
        if kind == "unavailable":
            raise StoreUnavailable(message)
        raise sqlite3.OperationalError(message) if kind == "sqlite" else WriterFailed(message)

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the oldest request waiting; fail them all if the process ends."""
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                answer = pickle.loads(await reader.readexactly(size))
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_result(answer)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = StoreUnavailable(f"the writer process ended: {exc!r}")
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_exception(error)
            if self._writer is not None:
                self._writer.close()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:  # until the connection owns our end, a failure or a cancel closes it here
            with theirs:
                # -P: the working directory is not put on the module path, so a `relay/`
                # folder there cannot stand in for the installed package.
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-P",
                    "-m",
                    self._module,
                    str(theirs.fileno()),
                    stdin=asyncio.subprocess.PIPE,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            assert self._process.stdin is not None
            self._process.stdin.write(self._config.encode())
            self._process.stdin.close()
            reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        self._answers = asyncio.create_task(self._read_answers(reader), name="relay-writer-answers")
        log.info("store.writer_process_started", pid=self._process.pid)

    async def _stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._answers is not None:
            await self._answers  # ends at the closed socket, failing what still waits
            self._answers = None
        if self._process is not None:
            process, self._process = self._process, None
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def sqlite_config(
    path: Path, store: StoreSettings, alerts: AlertSettings, providers: Mapping[str, str]
) -> dict[str, Any]:
    """What the SQLite writer process (`main`) is started with."""
    return {
        "path": str(path),
        "synchronous": store.synchronous,
        "busy_timeout_ms": store.busy_timeout_ms,
        "cache_bytes": store.cache_bytes,
        "turn_stall_seconds": alerts.turn_stall_seconds,
        "ready_timeout_seconds": alerts.ready_timeout_seconds,
        "providers": dict(providers),
    }


def _commit(changes: list[tuple[Any, ...]], versions: dict[str, int]) -> Commit:
    return Commit([StoredChange(*change) for change in changes], versions)


# -- the writer process --------------------------------------------------------------------


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from relay.store.sqlite_writer import BatchWriter

    config = json.loads(sys.stdin.read())
    providers: dict[str, str] = config["providers"]
    link = Reconnecting(lambda: _connect(config))
    writer = BatchWriter(
        link.conn,
        decoder(providers),
        config["turn_stall_seconds"],
        config["ready_timeout_seconds"],
        config["cache_bytes"],
    )
    normaliser = normaliser_lookup(providers)
    tune_gc()

    def write(wire: list[Wire]) -> tuple[Any, ...]:
        results, commit = writer.write(wire_records(normaliser, wire))
        return ("ok", [tuple(r) for r in results], *plain(commit))

    def run(op: str, argument: Any) -> tuple[Any, ...]:
        if op == "write":
            return write(argument)
        if op == "alerts":
            return ("ok", *plain(writer.fire_due_alerts(argument)))
        if op == "prune":
            pruned = writer.prune(*argument)
            return ("ok", (pruned.rows, pruned.full, pruned.sessions))
        if op == "probe":
            writer.probe()
            return ("ok", None)
        return ("error", "other", f"unknown request {op!r}")

    def answer(request: tuple[str, Any]) -> tuple[Any, ...]:
        op, argument = request
        try:
            writer.conn = link.current()
            reply = run(op, argument)
            link.succeeded()
            return reply
        except sqlite3.Error as exc:
            link.failed(exc)
            return ("error", "sqlite", str(exc))
        except Exception as exc:
            return ("error", "other", f"{type(exc).__name__}: {exc}")

    with socket.socket(fileno=fd) as sock, sock.makefile("rwb") as stream:
        while len(header := stream.read(HEADER.size)) == HEADER.size:
            (size,) = HEADER.unpack(header)
            reply = pickle.dumps(answer(pickle.loads(stream.read(size))), pickle.HIGHEST_PROTOCOL)
            stream.write(HEADER.pack(len(reply)) + reply)
            stream.flush()
    link.close()


def _connect(config: dict[str, Any]) -> sqlite3.Connection:
    conn = sqlite3.connect(config["path"], isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {config['synchronous']}")
    conn.execute(f"PRAGMA busy_timeout = {int(config['busy_timeout_ms'])}")
    # The relay copies the WAL back into the database in the background; the writer
    # checkpoints too once the WAL holds 2,000 pages (8 MiB), which then costs it little.
    # Only a checkpoint by the one writer, between its own transactions, lets the WAL start
    # over from its beginning: under writes that never pause, background checkpoints alone
    # never catch up with the end of the log, and the WAL would grow without bound.
    conn.execute("PRAGMA wal_autocheckpoint = 2000")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the indexes new events go into
    return conn


def wire_records(normaliser: Callable[[str], Normaliser], wire: list[Wire]) -> list[IngestRecord]:
    """A batch as it came over the socket, normalised again."""
    return [
        IngestRecord(normaliser(source)(source, orjson.loads(body), received), body, received)
        for source, body, received in wire
    ]


def plain(commit: Commit) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """A commit as the writer process answers it (plain tuples pickle fast)."""
    changes = [(c.id, c.type, c.session_id, c.turn_id, c.body) for c in commit.changes]
    return changes, dict(commit.sessions)


if __name__ == "__main__":
    main(int(sys.argv[1]))
