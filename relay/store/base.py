"""What every store backend shares on the event loop: group commit and ordered publish.

Concurrent ingests queue up while a batch is being committed and are then written
together in one transaction; each request is answered only after the commit of its
batch. What each commit produced is handed to the commit listeners in change id order.
A backend supplies how a batch is written (`write`), which of its errors mean that the
store cannot write now (`unavailable`), and how committed changes are read back.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from relay.changes import Commit, StoredChange
from relay.store import IngestRecord, IngestResult, StoreUnavailable

log = structlog.get_logger("relay.store")

# The records of one request, written in one transaction, and where their results go.
Pending = tuple[list[IngestRecord], "asyncio.Future[list[IngestResult]]"]
WriteBatch = Callable[[list[IngestRecord]], Awaitable[tuple[list[IngestResult], Commit]]]
ReadChanges = Callable[[int, int], Awaitable[list[StoredChange]]]

_MISSED_PAGE = 500


class GroupCommit:
    """The queue of pending ingests, written in batches, and the ordered publish.

    `in_flight` batches may be written at once (a backend that answers in order, such
    as the SQLite writer process, takes the next batch while one commits). With
    `fill_gaps`, a commit whose first change id is past the next one expected is
    preceded by the changes in between, read back from the store: the one writer
    committed them but its answer was lost. Several writers (cluster mode) leave no
    such gaps to fill here: other instances' changes reach subscribers through the hub.

    A backend whose batches take their change ids in one order and commit in it (a
    lock held from taking the ids to the commit) but whose answers may resume out of
    it says so with `hold` when it takes the ids: a commit with later ids is then not
    handed over before that one is (or before it is dropped with `release`).
    """

    def __init__(
        self,
        write: WriteBatch,
        read_changes: ReadChanges,
        unavailable: Callable[[Exception], StoreUnavailable | None],
        batch_max: int,
        in_flight: int = 1,
        fill_gaps: bool = True,
    ) -> None:
        self._write = write
        self._read_changes = read_changes
        self._unavailable = unavailable
        self._batch_max = batch_max
        self._in_flight = in_flight
        self._fill_gaps = fill_gaps
        self.listeners: list[Callable[[Commit], None]] = []
        self._pending: deque[Pending] = deque()
        self._writing: dict[asyncio.Task[None], list[Pending]] = {}  # batches not answered
        self._published = 0  # the newest change id handed to the commit listeners
        self._publishing = asyncio.Lock()
        self._held: dict[int, asyncio.Event] = {}  # first change ids taken, not handed over
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self, published: int) -> None:
        """Start writing; changes up to `published` are taken as handed over."""
        self._closing = False
        self._published = published
        self._task = asyncio.create_task(self._write_loop(), name="relay-group-commit")

    @property
    def running(self) -> bool:
        return not self._closing and self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def ingest(self, record: IngestRecord) -> IngestResult:
        return (await self.ingest_many([record]))[0]

    async def ingest_many(self, records: list[IngestRecord]) -> list[IngestResult]:
        """Store a request's records in one transaction (never split across batches)."""
        if not self.running:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[list[IngestResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((records, future))
        self._wakeup.set()
        return await future

    def oldest_unwritten(self, now: float) -> float:
        """`now`, or the earliest receive time of an ingest queued or still committing:
        an alert waits for what came before it, which may end what it is about."""
        unwritten = [*self._pending, *(i for batch in self._writing.values() for i in batch)]
        return min([now, *(r.received_at.timestamp() for records, _ in unwritten for r in records)])

    async def _write_loop(self) -> None:
        """Take what is queued as one batch whenever the writer can take another."""
        slots = asyncio.Semaphore(self._in_flight)
        in_flight = self._writing

        def finished(task: asyncio.Task[None], written: Callable[[], None]) -> None:
            in_flight.pop(task, None)
            written()

        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await slots.acquire()
                batch = [self._pending.popleft()]  # a request's records are never split
                size = len(batch[0][0])
                while self._pending and size + len(self._pending[0][0]) <= self._batch_max:
                    size += len(self._pending[0][0])
                    batch.append(self._pending.popleft())
                written = _once(slots.release)
                task = asyncio.create_task(self._write_batch(batch, written))
                in_flight[task] = batch
                task.add_done_callback(functools.partial(finished, written=written))
            if self._closing:
                await asyncio.gather(*in_flight)
                return

    async def _write_batch(
        self, batch: list[Pending], written: Callable[[], None] = lambda: None
    ) -> None:
        """Write a batch; answer each request only once its batch has committed.

        Once the writer has answered, `written` lets the next batch go to it while this
        one's requests are answered and its changes published (else once this ends).
        A batch that fails for another reason than the store's is written again one
        request at a time, so that one request the writer cannot handle fails alone.
        """
        try:
            results, commit = await self._write([r for records, _ in batch for r in records])
        except StoreUnavailable as exc:
            _fail(batch, exc)
            await self.deliver(None)  # the writer may have committed before it ended
            return
        except Exception as exc:
            unavailable = self._unavailable(exc)
            if unavailable is not None:
                _fail(batch, unavailable)
                return
            if len(batch) > 1:
                for item in batch:
                    await self._write_batch([item])
                return
            log.exception("store.event_failed", event_id=batch[0][0][0].event.id)
            _fail(batch, StoreUnavailable(f"the store could not take this event: {exc}"))
            return
        written()
        task = asyncio.current_task()
        if task is not None and self._writing.get(task) is batch:
            del self._writing[task]  # written: no alert has to wait for it any more
        start = 0
        for records, future in batch:
            if not future.done():
                future.set_result(results[start : start + len(records)])
            start += len(records)
        await self.deliver(commit)

    def hold(self, first: int) -> None:
        """Changes from id `first` on were just taken by a transaction not committed yet:
        commits of later ids wait for it to be delivered or released."""
        self._held[first] = asyncio.Event()

    def release(self, first: int) -> None:
        """The transaction that held `first` ended without a commit to deliver."""
        held = self._held.pop(first, None)
        if held is not None:
            held.set()

    async def deliver(self, commit: Commit | None) -> None:
        """Hand `commit` to the listeners, in change id order after any change that was
        committed but never handed over. With no commit, only look for one."""
        first = commit.changes[0].id if commit is not None and commit.changes else None
        try:
            if first is not None:  # lower ids held now were taken before: wait for them
                for earlier in [held for key, held in self._held.items() if key < first]:
                    await earlier.wait()
            async with self._publishing:  # taken in commit order: answers come in order
                if commit is None:
                    if self._fill_gaps:
                        await self._publish_missed(None)
                    return
                if self._fill_gaps and first is not None and first > self._published + 1:
                    await self._publish_missed(first)
                self._publish(commit)
        finally:
            if first is not None:
                self.release(first)

    async def _publish_missed(self, before: int | None) -> None:
        """Publish the stored changes after the last one published (and before `before`);
        if they cannot be read, say so and go on (the commit in hand is published still)."""
        try:
            await self._read_missed(before)
        except Exception:
            log.exception("store.missed_changes_unreadable", after=self._published)

    async def _read_missed(self, before: int | None) -> None:
        while before is None or self._published + 1 < before:
            limit = (
                _MISSED_PAGE if before is None else min(_MISSED_PAGE, before - 1 - self._published)
            )
            missed = await self._read_changes(self._published, limit)
            if missed:
                log.warning("store.unannounced_changes", first=missed[0].id, last=missed[-1].id)
                sessions = {c.session_id: 0 for c in missed if c.session_id}
                self._publish(Commit(missed, sessions))
            if len(missed) < limit:
                return

    def _publish(self, commit: Commit) -> None:
        if commit.changes and commit.changes[0].id <= self._published:  # handed over already
            commit = Commit([c for c in commit.changes if c.id > self._published], commit.sessions)
        if commit.changes:
            self._published = max(self._published, commit.changes[-1].id)
        if not (commit.changes or commit.sessions):
            return
        for listener in self.listeners:
            try:
                listener(commit)
            except Exception:
                log.exception("store.listener_failed")


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, run the first time the result is called and never again."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


def _fail(batch: list[Pending], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
