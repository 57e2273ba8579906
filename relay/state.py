"""Derived session and turn state: a pure fold over canonical events, with no I/O."""

# Theory of operation
# -------------------
#
# A session is *ready* when the newest `agent.worker.ready` is at least as new (by
# `occurred_at`) as the newest runtime event (`agent.runtime.reused` / `.started`) and
# as the newest `agent.scope.activated`; it is *provisioning* otherwise, from its first
# event on. A turn is `running` once started; a terminal event (`completed`, `failed`)
# wins over anything else, and between two terminals the newer wins, a tie in
# `occurred_at` goes to `failed`, then the larger (event id, source). A `conflict` is
# not terminal: the newer of the newest conflict and the newest start decides (a tie
# goes to `conflict`), so a turn id retried after a conflict can run again. Tool calls
# are sets of (call id, tool name), started and ended ones; a call runs while it is
# started and not ended and its turn is `running`. Activity events (text a turn
# streamed) and tool events move only the turn's `updated_at`, its last activity.
#
# Nothing here depends on arrival order. Each event only ever joins into `Facts`:
# every fact is "the newest (or oldest) event of a kind", chosen by a total order on
# (occurred_at, event id, source), or a min / max of timestamps. Such joins are
# commutative, associative and idempotent, so any permutation of the same events,
# with any duplicates, gives equal facts. The public `SessionState` / `TurnState` are
# pure projections of the facts; only their `version` counters (bumped by one when a
# projection changes) and the emitted `Change`s reflect the order events arrived in.
#
# Where SPEC is silent: `runtime_reused` describes the newest runtime event;
# `worker_ready` means a worker-ready at least as new as the newest runtime event;
# `scope_activated` means one was ever seen; `ready_at` is the earliest worker-ready
# and `time_to_ready_ms` runs from `created_at` to it (floored at 0). A turn's usage is
# that of its newest event carrying usage; conflict details are shown only while the
# turn is in `conflict`. `active_turn_id` is the running turn started last (ties: the
# larger turn id); `last_turn` is the turn with the newest event (same tie rule).
# Turn events without a turn id, unknown types and events without a session id change
# nothing. Changes are emitted on status transitions, and for each step of a session
# that is provisioning: `session.provisioning` when it stops being ready, and again
# whenever its runtime, scope or worker details change before it is ready, so that a
# dashboard sees every step. Any other snapshot update (e.g. a late `started` filling
# in `started_at` of a completed turn) bumps the versions but emits no change: the
# changes subscribers act on (`turn.completed`, `session.ready`, ...) come once each.
#
# What an event costs does not grow with the session: the facts and snapshots of its
# turns are persistent maps, the running turns a persistent sorted set (by start, for
# `active_turn_id`), and the counts, usage sums and last turn move by the difference one
# turn makes. An event therefore touches its own turn and O(log n) of the rest, and a
# record that an event changed stays as it was, so a batch can be abandoned.

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, overload

from immutables import Map

from relay.events import Event, EventType, TurnError, Usage
from relay.sorted_keys import SortedKeys
from relay.timefmt import format_time

_RUNTIME = {EventType.RUNTIME_REUSED, EventType.RUNTIME_STARTED}
_TERMINAL = {EventType.TURN_COMPLETED, EventType.TURN_FAILED}
_TOOL = {EventType.TOOL_STARTED, EventType.TOOL_COMPLETED}
_TURN = {
    EventType.TURN_STARTED,
    EventType.TURN_CONFLICT,
    *_TERMINAL,
    *_TOOL,
    EventType.TURN_ACTIVITY,
}
_KNOWN = set(EventType)
_MS = timedelta(milliseconds=1)


class Readiness(StrEnum):
    PROVISIONING = "provisioning"
    READY = "ready"


class TurnStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CONFLICT = "conflict"


class SessionTurnStatus(StrEnum):
    IDLE = "idle"
    RUNNING = "running"


class ChangeType(StrEnum):
    SESSION_CREATED = "session.created"
    SESSION_PROVISIONING = "session.provisioning"
    SESSION_READY = "session.ready"
    TURN_STARTED = "turn.started"
    TURN_COMPLETED = "turn.completed"
    TURN_FAILED = "turn.failed"
    TURN_CONFLICT = "turn.conflict"
    TURN_STALLED = "turn.stalled"
    SESSION_READY_TIMEOUT = "session.ready_timeout"


_TURN_CHANGE = {
    TurnStatus.RUNNING: ChangeType.TURN_STARTED,
    TurnStatus.COMPLETED: ChangeType.TURN_COMPLETED,
    TurnStatus.FAILED: ChangeType.TURN_FAILED,
    TurnStatus.CONFLICT: ChangeType.TURN_CONFLICT,
}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _key(event: Event) -> tuple[datetime, str, str]:
    return (event.occurred_at, event.id, event.source)


def _terminal_key(event: Event) -> tuple[datetime, bool, str, str]:
    return (event.occurred_at, event.type == EventType.TURN_FAILED, event.id, event.source)


def _newest(
    old: Event | None, new: Event, when: bool, key: Callable[[Event], Any] = _key
) -> Event | None:
    return new if when and (old is None or key(new) > key(old)) else old


def _oldest(old: Event | None, new: Event, when: bool) -> Event | None:
    return new if when and (old is None or _key(new) < _key(old)) else old


def _after(event: Event, moment: datetime | None) -> bool:
    return moment is None or event.occurred_at > moment


@dataclass(frozen=True, slots=True)
class TurnFacts:
    """What is known about one turn: the deciding event of each kind."""

    started: Event | None = None
    conflict: Event | None = None
    terminal: Event | None = None
    usage: Event | None = None
    latest: Event | None = None
    tools_started: frozenset[tuple[str, str]] = frozenset()
    tools_ended: frozenset[tuple[str, str]] = frozenset()

    def merge(self, event: Event) -> TurnFacts:
        """The joined facts; `self` itself when the event adds nothing."""
        kind = event.type
        started = _newest(self.started, event, kind == EventType.TURN_STARTED)
        conflict = _newest(self.conflict, event, kind == EventType.TURN_CONFLICT)
        terminal = _newest(self.terminal, event, kind in _TERMINAL, _terminal_key)
        usage = _newest(self.usage, event, event.usage is not None)
        latest = _newest(self.latest, event, True)
        tools_started, tools_ended = self.tools_started, self.tools_ended
        if kind in _TOOL and event.tool_call_id is not None:
            call = (event.tool_call_id, event.tool_name or "")
            if kind == EventType.TOOL_STARTED and call not in tools_started:
                tools_started = tools_started | {call}
            elif kind == EventType.TOOL_COMPLETED and call not in tools_ended:
                tools_ended = tools_ended | {call}
        if (
            started is self.started
            and conflict is self.conflict
            and terminal is self.terminal
            and usage is self.usage
            and latest is self.latest
            and tools_started is self.tools_started
            and tools_ended is self.tools_ended
        ):
            return self
        return TurnFacts(started, conflict, terminal, usage, latest, tools_started, tools_ended)


_NO_TURN_FACTS = TurnFacts()


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known about one session; merging an event is a join (see the top)."""

    session_id: str
    first_event_at: datetime
    last_event_at: datetime
    created: Event | None = None
    runtime: Event | None = None
    scope: Event | None = None
    first_ready: Event | None = None
    last_ready: Event | None = None
    turns: Map[str, TurnFacts] = field(default_factory=Map)
    providers: frozenset[str] = frozenset()

    def merge(self, event: Event) -> Facts:
        """The joined facts; `self` itself when the event adds nothing.

        Every slot only ever moves to a strictly newer (or older) event, so "nothing
        changed" is a test of identity, which costs the same however many turns there are.
        """
        kind, turns, when = event.type, self.turns, event.occurred_at
        if kind in _TURN and event.turn_id is not None:
            old_turn = turns.get(event.turn_id)
            turn = (_NO_TURN_FACTS if old_turn is None else old_turn).merge(event)
            if turn is not old_turn:
                turns = turns.set(event.turn_id, turn)
        ready = kind == EventType.WORKER_READY
        first_event_at = self.first_event_at if self.first_event_at <= when else when
        last_event_at = self.last_event_at if self.last_event_at >= when else when
        created = _oldest(self.created, event, kind == EventType.SESSION_CREATED)
        runtime = _newest(self.runtime, event, kind in _RUNTIME)
        scope = _newest(self.scope, event, kind == EventType.SCOPE_ACTIVATED)
        first_ready = _oldest(self.first_ready, event, ready)
        last_ready = _newest(self.last_ready, event, ready)
        providers = self.providers
        if event.provider is not None and event.provider not in providers:
            providers = providers | {event.provider}
        if (
            turns is self.turns
            and first_event_at is self.first_event_at
            and last_event_at is self.last_event_at
            and created is self.created
            and runtime is self.runtime
            and scope is self.scope
            and first_ready is self.first_ready
            and last_ready is self.last_ready
            and providers is self.providers
        ):
            return self
        return Facts(
            self.session_id,
            first_event_at,
            last_event_at,
            created,
            runtime,
            scope,
            first_ready,
            last_ready,
            turns,
            providers,
        )


@dataclass(frozen=True, slots=True)
class TurnState:
    session_id: str
    turn_id: str
    status: TurnStatus
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    usage: Usage | None
    error: TurnError | None
    active_turn_id: str | None
    retry_after_seconds: float | None
    updated_at: datetime
    tool_calls: int
    tools_running: tuple[str, ...]
    version: int = field(compare=False)  # equal snapshots are equal at any version

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "status": self.status.value,
            "started_at": _time(self.started_at),
            "ended_at": _time(self.ended_at),
            "duration_ms": self.duration_ms,
            "usage": _usage_dict(self.usage),
            "error": None
            if self.error is None
            else {"message": self.error.message, "code": self.error.code},
            "active_turn_id": self.active_turn_id,
            "retry_after_seconds": self.retry_after_seconds,
            "updated_at": format_time(self.updated_at),
            "tool_calls": {"count": self.tool_calls, "running": list(self.tools_running)},
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class TurnCounts:
    turns: int = 0
    completed: int = 0
    failed: int = 0
    conflicts: int = 0


@dataclass(frozen=True, slots=True)
class SessionState:
    session_id: str
    provider: str | None
    readiness: Readiness
    runtime_reused: bool | None
    scope_activated: bool
    worker_ready: bool
    created_at: datetime
    ready_at: datetime | None
    time_to_ready_ms: int | None
    turn_status: SessionTurnStatus
    active_turn_id: str | None
    last_turn: TurnState | None
    counts: TurnCounts
    usage: Usage
    first_event_at: datetime
    last_event_at: datetime
    version: int = field(compare=False)  # equal snapshots are equal at any version

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "session_id": self.session_id,
            "provider": self.provider,
            "readiness": self.readiness.value,
            "runtime_reused": self.runtime_reused,
            "scope_activated": self.scope_activated,
            "worker_ready": self.worker_ready,
            "created_at": format_time(self.created_at),
            "ready_at": _time(self.ready_at),
            "time_to_ready_ms": self.time_to_ready_ms,
            "turn_status": self.turn_status.value,
            "active_turn_id": self.active_turn_id,
            "last_turn": None if self.last_turn is None else self.last_turn.to_dict(),
            "counts": {
                "turns": counts.turns,
                "completed": counts.completed,
                "failed": counts.failed,
                "conflicts": counts.conflicts,
            },
            "usage": _usage_dict(self.usage),
            "first_event_at": format_time(self.first_event_at),
            "last_event_at": format_time(self.last_event_at),
            "version": self.version,
        }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _error_dict(error: TurnError | None) -> dict[str, str | None] | None:
    return None if error is None else {"message": error.message, "code": error.code}


def _usage_dict(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "cost_micros": usage.cost_micros,
    }


@dataclass(frozen=True, slots=True)
class Change:
    """One state change, ready to be appended to the change log (which assigns its id)."""

    type: ChangeType
    session_id: str
    turn_id: str | None
    occurred_at: datetime
    session: SessionState
    turn: TurnState | None
    cause: Event

    def to_dict(
        self, snapshot: Callable[[SessionState | TurnState], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The change as JSON-ready data; `snapshot` may stand in for the snapshots'
        `to_dict` (to build each snapshot's dict once for several changes)."""
        cause = {"event_id": self.cause.id, "source": self.cause.source, "type": self.cause.type}
        as_dict = _snapshot_dict if snapshot is None else snapshot
        return {
            "type": str(self.type),
            "occurred_at": format_time(self.occurred_at),
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "session": as_dict(self.session),
            "turn": None if self.turn is None else as_dict(self.turn),
            "cause": cause,
        }


def _snapshot_dict(snapshot: SessionState | TurnState) -> dict[str, Any]:
    return snapshot.to_dict()


@dataclass(frozen=True, slots=True)
class Deadline:
    """When an alert of `type` becomes due, if the state has not moved on by then."""

    type: ChangeType
    session_id: str
    turn_id: str | None
    at: datetime


def _project_turn(session_id: str, turn_id: str, facts: TurnFacts, version: int) -> TurnState:
    started, conflict, terminal = facts.started, facts.conflict, facts.terminal
    if terminal is not None:
        failed = terminal.type == EventType.TURN_FAILED
        status = TurnStatus.FAILED if failed else TurnStatus.COMPLETED
    elif conflict is not None and (started is None or conflict.occurred_at >= started.occurred_at):
        status = TurnStatus.CONFLICT
    else:
        status = TurnStatus.RUNNING
    started_at = None if started is None else started.occurred_at
    ended_at = None if terminal is None else terminal.occurred_at
    duration = None
    if started_at is not None and ended_at is not None:
        duration = max(0, (ended_at - started_at) // _MS)
    shown = conflict if status == TurnStatus.CONFLICT else None
    events = [e for e in (started, conflict, terminal, facts.usage, facts.latest) if e]
    ended = {call_id for call_id, _ in facts.tools_ended}
    running: dict[str, str] = {}
    if status == TurnStatus.RUNNING:
        for call_id, name in sorted(facts.tools_started):
            if call_id not in ended:
                running.setdefault(call_id, name)
    return TurnState(
        session_id=session_id,
        turn_id=turn_id,
        status=status,
        started_at=started_at,
        ended_at=ended_at,
        duration_ms=duration,
        usage=None if facts.usage is None else facts.usage.usage,
        error=terminal.error if terminal is not None and status == TurnStatus.FAILED else None,
        active_turn_id=None if shown is None else shown.active_turn_id,
        retry_after_seconds=None if shown is None else shown.retry_after_seconds,
        updated_at=max(e.occurred_at for e in events),
        tool_calls=len({call_id for call_id, _ in facts.tools_started} | ended),
        tools_running=tuple(running.values()),
        version=version,
    )


def _project_session(
    facts: Facts, turns: Mapping[str, TurnState], summary: TurnSummary, version: int
) -> SessionState:
    last_ready = None if facts.last_ready is None else facts.last_ready.occurred_at
    after_ready = [
        e for e in (facts.runtime, facts.scope) if e is not None and _after(e, last_ready)
    ]
    ready = last_ready is not None and not after_ready
    created_at = facts.first_event_at if facts.created is None else facts.created.occurred_at
    ready_at = None if facts.first_ready is None else facts.first_ready.occurred_at
    runtime_at = None if facts.runtime is None else facts.runtime.occurred_at
    active_id = summary.active_turn_id
    return SessionState(
        session_id=facts.session_id,
        provider=",".join(sorted(facts.providers)) or None,
        readiness=Readiness.READY if ready else Readiness.PROVISIONING,
        runtime_reused=(
            None if facts.runtime is None else facts.runtime.type == EventType.RUNTIME_REUSED
        ),
        scope_activated=facts.scope is not None,
        worker_ready=last_ready is not None and (runtime_at is None or runtime_at <= last_ready),
        created_at=created_at,
        ready_at=ready_at,
        time_to_ready_ms=None if ready_at is None else max(0, (ready_at - created_at) // _MS),
        turn_status=SessionTurnStatus.IDLE if active_id is None else SessionTurnStatus.RUNNING,
        active_turn_id=active_id,
        last_turn=summary.last_turn,
        counts=summary.counts,
        usage=summary.usage,
        first_event_at=facts.first_event_at,
        last_event_at=facts.last_event_at,
        version=version,
    )


RunKey = tuple[datetime, str]  # (started_at, or the last activity if not started; turn id)


@dataclass(frozen=True, slots=True)
class TurnSummary:
    """What a session's snapshot needs from all of its turns, kept one turn at a time.

    A turn that changes moves the counts and the usage sum by its difference, may
    become the last turn (a turn's `updated_at` never goes back), and moves in the sorted
    set of running turns, so an event costs about the same in a session with thousands of
    turns, running or done, as in one with two.
    """

    running: Map[str, RunKey] = field(default_factory=Map)  # turn id -> its place below
    counts: TurnCounts = TurnCounts()
    usage: Usage = field(default_factory=Usage)
    last_turn: TurnState | None = None
    by_start: SortedKeys[RunKey] = field(default_factory=SortedKeys, compare=False)

    @property
    def active_turn_id(self) -> str | None:
        """The running turn started last (ties: the larger turn id)."""
        newest = self.by_start.max()
        return None if newest is None else newest[1]

    def with_turn(self, old: TurnState | None, new: TurnState) -> TurnSummary:
        """The summary after turn `new.turn_id` went from `old` (None: unseen) to `new`."""
        turn_id, running, by_start = new.turn_id, self.running, self.by_start
        was = running.get(turn_id)
        place = _run_key(new) if new.status == TurnStatus.RUNNING else None
        if place != was:
            if was is not None:
                running, by_start = running.delete(turn_id), by_start.remove(was)
            if place is not None:
                running, by_start = running.set(turn_id, place), by_start.add(place)
        before = None if old is None else old.status
        c = self.counts
        counts = TurnCounts(
            turns=c.turns + (old is None),
            completed=c.completed + _moved(TurnStatus.COMPLETED, before, new.status),
            failed=c.failed + _moved(TurnStatus.FAILED, before, new.status),
            conflicts=c.conflicts + _moved(TurnStatus.CONFLICT, before, new.status),
        )
        usage = self.usage
        if old is not None and old.usage is not None:
            usage = _add_usage(usage, old.usage, -1)
        if new.usage is not None:
            usage = _add_usage(usage, new.usage, 1)
        last = self.last_turn
        if last is None or last.turn_id == turn_id or _recency(new) > _recency(last):
            last = new
        return TurnSummary(running, counts, usage, last, by_start)


def _run_key(turn: TurnState) -> RunKey:
    return (turn.started_at or turn.updated_at, turn.turn_id)


def _summarize(turns: Mapping[str, TurnState]) -> TurnSummary:
    """The summary of all of a session's turns, built in one pass."""
    statuses = [turn.status for turn in turns.values()]
    counts = TurnCounts(
        turns=len(statuses),
        completed=statuses.count(TurnStatus.COMPLETED),
        failed=statuses.count(TurnStatus.FAILED),
        conflicts=statuses.count(TurnStatus.CONFLICT),
    )
    usage = Usage()
    for turn in turns.values():
        if turn.usage is not None:
            usage = _add_usage(usage, turn.usage, 1)
    running = {
        turn_id: _run_key(t) for turn_id, t in turns.items() if t.status == TurnStatus.RUNNING
    }
    last = max(turns.values(), key=_recency, default=None)
    return TurnSummary(Map(running), counts, usage, last, SortedKeys.of(running.values()))


def _moved(status: TurnStatus, before: TurnStatus | None, after: TurnStatus) -> int:
    return (after == status) - (before == status)


def _recency(turn: TurnState) -> tuple[datetime, str]:
    return (turn.updated_at, turn.turn_id)


def _add_usage(total: Usage, usage: Usage, sign: int) -> Usage:
    return Usage(
        total.input_tokens + sign * usage.input_tokens,
        total.output_tokens + sign * usage.output_tokens,
        total.reasoning_tokens + sign * usage.reasoning_tokens,
        total.total_tokens + sign * usage.total_tokens,
        total.cost_micros + sign * usage.cost_micros,
    )


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session's facts with their derived snapshots and version counters."""

    facts: Facts
    session: SessionState
    turns: Map[str, TurnState]
    summary: TurnSummary

    @property
    def session_id(self) -> str:
        return self.facts.session_id

    def to_json(self) -> dict[str, Any]:
        f = self.facts
        return {
            "format": 1,
            "session_id": f.session_id,
            "version": self.session.version,
            "first_event_at": f.first_event_at.isoformat(),
            "last_event_at": f.last_event_at.isoformat(),
            **{k: _event_to_json(getattr(f, k)) for k in _SESSION_SLOTS},
            "providers": sorted(f.providers),
            "turns": {
                turn_id: {
                    "version": self.turns[turn_id].version,
                    **{k: _event_to_json(getattr(t, k)) for k in _TURN_SLOTS},
                    "tools_started": sorted(t.tools_started),
                    "tools_ended": sorted(t.tools_ended),
                }
                for turn_id, t in f.turns.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionRecord:
        if data.get("format") != 1:
            raise ValueError(f"unknown session record format {data.get('format')!r}")
        sid = data["session_id"]
        facts = Facts(
            session_id=sid,
            first_event_at=datetime.fromisoformat(data["first_event_at"]),
            last_event_at=datetime.fromisoformat(data["last_event_at"]),
            **{k: _event_from_json(data[k], sid) for k in _SESSION_SLOTS},
            turns=Map(
                {
                    turn_id: TurnFacts(
                        **{k: _event_from_json(t.get(k), sid) for k in _TURN_SLOTS},
                        tools_started=_calls(t.get("tools_started")),
                        tools_ended=_calls(t.get("tools_ended")),
                    )
                    for turn_id, t in data["turns"].items()
                }
            ),
            providers=frozenset(data.get("providers", ())),
        )
        turns = Map(
            {
                turn_id: _project_turn(sid, turn_id, t, data["turns"][turn_id]["version"])
                for turn_id, t in facts.turns.items()
            }
        )
        summary = _summarize(turns)
        return cls(facts, _project_session(facts, turns, summary, data["version"]), turns, summary)

    @classmethod
    def rebuild(cls, facts: Facts, version: int, turn_versions: Mapping[str, int]) -> SessionRecord:
        """The record of stored `facts`, its snapshots at the versions they had."""
        sid = facts.session_id
        turns = Map(
            {
                turn_id: _project_turn(sid, turn_id, t, turn_versions[turn_id])
                for turn_id, t in facts.turns.items()
            }
        )
        summary = _summarize(turns)
        return cls(facts, _project_session(facts, turns, summary, version), turns, summary)

    @classmethod
    def restore(
        cls,
        facts: Facts,
        version: int,
        turn_versions: Mapping[str, int],
        summary: StoredSummary,
    ) -> SessionRecord:
        """The record of stored `facts` whose turns are only some of the session's (its
        last one at least, and its running ones unless `summary` places them); the
        summary's counts and usage are over all of them.

        The other turns stay where they are stored until an event for one arrives
        (`with_stored_turns`), so this costs as much as the turns given.
        """
        sid = facts.session_id
        turns = Map(
            {
                turn_id: _project_turn(sid, turn_id, t, turn_versions[turn_id])
                for turn_id, t in facts.turns.items()
            }
        )
        running = summary.running
        if running is None:
            running = {
                turn_id: _run_key(t)
                for turn_id, t in turns.items()
                if t.status == TurnStatus.RUNNING
            }
        last = None if summary.last_turn_id is None else turns[summary.last_turn_id]
        kept = TurnSummary(
            Map(running), summary.counts, summary.usage, last, SortedKeys.of(running.values())
        )
        return cls(facts, _project_session(facts, turns, kept, version), turns, kept)

    def with_stored_turns(self, stored: Mapping[str, tuple[TurnFacts, int]]) -> SessionRecord:
        """The same record holding also the stored turns given (facts, snapshot version),
        which its summary already counts."""
        sid = self.facts.session_id
        added = {turn_id: turn for turn_id, (turn, _) in stored.items()}
        facts = replace(self.facts, turns=self.facts.turns.update(added))
        turns = self.turns.update(
            {k: _project_turn(sid, k, t, version) for k, (t, version) in stored.items()}
        )
        return SessionRecord(facts, self.session, turns, self.summary)


@dataclass(frozen=True, slots=True)
class StoredSummary:
    """What a session's stored facts keep of its turn summary: its counts and usage sum
    over all turns, its last turn's id and, if read, each running turn's place."""

    counts: TurnCounts
    usage: Usage
    last_turn_id: str | None
    running: Mapping[str, RunKey] | None = None  # None: from the turns given


_SESSION_SLOTS = ("created", "runtime", "scope", "first_ready", "last_ready")
_TURN_SLOTS = ("started", "conflict", "terminal", "usage", "latest")
_EVENT_FIELDS = ("source", "id", "type", "turn_id", "active_turn_id", "retry_after_seconds")
_EVENT_EXTRA = ("tool_call_id", "tool_name", "provider")  # absent from older records


def _calls(pairs: Any) -> frozenset[tuple[str, str]]:
    return frozenset((call_id, name) for call_id, name in pairs or ())


def _event_to_json(event: Event | None) -> dict[str, Any] | None:
    if event is None:
        return None
    data = {
        f.name: getattr(event, f.name)
        for f in fields(event)
        if f.name in _EVENT_FIELDS or f.name in _EVENT_EXTRA
    }
    data["occurred_at"] = event.occurred_at.isoformat()
    data["usage"] = None if event.usage is None else asdict(event.usage)
    data["error"] = None if event.error is None else asdict(event.error)
    return data


def _event_from_json(data: Mapping[str, Any] | None, session_id: str) -> Event | None:
    if data is None:
        return None
    usage, error = data["usage"], data["error"]
    named: dict[str, Any] = {name: data.get(name) for name in (*_EVENT_FIELDS, *_EVENT_EXTRA)}
    return Event(
        **named,
        session_id=session_id,
        occurred_at=datetime.fromisoformat(data["occurred_at"]),
        usage=None if usage is None else Usage(**usage),
        error=None if error is None else TurnError(**error),
    )


def affects_state(event: Event) -> bool:
    """Whether `apply` would look at this event at all."""
    if event.session_id is None or event.type not in _KNOWN:
        return False
    return event.type not in _TURN or event.turn_id is not None


@overload
def apply(record: SessionRecord, event: Event) -> tuple[SessionRecord, list[Change]]: ...
@overload
def apply(record: None, event: Event) -> tuple[SessionRecord | None, list[Change]]: ...
def apply(record: SessionRecord | None, event: Event) -> tuple[SessionRecord | None, list[Change]]:
    """Join `event` into the session's record; return the new record and its changes.

    The record comes back as the same object when the event changes nothing.
    """
    if not affects_state(event):
        return record, []
    session_id = event.session_id
    assert session_id is not None
    if record is not None and record.session_id != session_id:
        raise ValueError(f"event {event.id} is for session {session_id}, not {record.session_id}")
    event = Event(
        event.source,
        event.id,
        event.type,
        _utc(event.occurred_at),
        event.session_id,
        event.turn_id,
        None,
        event.usage,
        event.error,
        event.active_turn_id,
        event.retry_after_seconds,
        event.tool_call_id,
        event.tool_name,
        event.provider,
    )
    if record is None:
        facts = Facts(session_id, event.occurred_at, event.occurred_at).merge(event)
    else:
        facts = record.facts.merge(event)
        if facts is record.facts:
            return record, []
    turns: Map[str, TurnState] = Map() if record is None else record.turns
    summary = TurnSummary() if record is None else record.summary
    old_turn = None
    if event.turn_id is not None and event.turn_id in facts.turns:
        old_turn = turns.get(event.turn_id)
        # Projected at the next version; kept only if it differs (versions aside).
        turn = _project_turn(
            facts.session_id,
            event.turn_id,
            facts.turns[event.turn_id],
            1 if old_turn is None else old_turn.version + 1,
        )
        if turn != old_turn:
            turns = turns.set(event.turn_id, turn)
            summary = summary.with_turn(old_turn, turn)
    old = None if record is None else record.session
    session = _project_session(facts, turns, summary, 1 if old is None else old.version + 1)
    if old is not None and session == old:
        session = old

    def change(kind: ChangeType, turn: TurnState | None = None) -> Change:
        turn_id = None if turn is None else turn.turn_id
        return Change(kind, facts.session_id, turn_id, event.occurred_at, session, turn, event)

    changes = []
    if old is None:
        changes.append(change(ChangeType.SESSION_CREATED))
    if session.readiness == Readiness.READY and (old is None or old.readiness != Readiness.READY):
        changes.append(change(ChangeType.SESSION_READY))
    if session.readiness == Readiness.PROVISIONING and old and _provisioning_moved(old, session):
        changes.append(change(ChangeType.SESSION_PROVISIONING))
    new_turn = turns.get(event.turn_id) if event.turn_id is not None else None
    if new_turn is not None and (old_turn is None or old_turn.status != new_turn.status):
        changes.append(change(_TURN_CHANGE[new_turn.status], new_turn))
    return SessionRecord(facts, session, turns, summary), changes


def _provisioning_moved(old: SessionState, new: SessionState) -> bool:
    """A provisioning session took a step: it was ready, or a readiness detail changed."""
    return (
        old.readiness != new.readiness
        or old.runtime_reused != new.runtime_reused
        or old.scope_activated != new.scope_activated
        or old.worker_ready != new.worker_ready
    )


def derive_session(events: Iterable[Event]) -> SessionRecord | None:
    """Fold one session's events into its record; None if none of them affects state."""
    record: SessionRecord | None = None
    for event in events:
        record, _ = apply(record, event)
    return record


def alert_deadlines(
    record: SessionRecord, turn_stall_seconds: float, ready_timeout_seconds: float
) -> list[Deadline]:
    """Due times (by event time) of `turn.stalled` and `session.ready_timeout` alerts.

    Lists every deadline of the session, so it costs as much as the session has running
    turns; `alert_deadline_changes` gives only what an update moved.
    """
    deadlines = []
    ready = _ready_deadline(record, ready_timeout_seconds)
    if ready is not None:
        deadlines.append(ready)
    for turn_id in sorted(record.summary.running):
        stall = _stall_deadline(record, turn_id, turn_stall_seconds)
        if stall is not None:
            deadlines.append(stall)
    return deadlines


def alert_deadline_changes(
    old: SessionRecord | None,
    new: SessionRecord,
    turn_ids: Iterable[str],
    turn_stall_seconds: float,
    ready_timeout_seconds: float,
) -> tuple[list[Deadline], list[Deadline]]:
    """The deadlines that going from `old` to `new` added and removed.

    `turn_ids` are the turns that may differ between the two (those of the events
    applied in between): only they and the session are looked at, so the cost does not
    depend on how many turns the session has. A deadline whose due time moved is in
    both lists (removed with its old time, added with its new one).
    """
    added: list[Deadline] = []
    removed: list[Deadline] = []

    def compare(before: Deadline | None, after: Deadline | None) -> None:
        if before == after:
            return
        if before is not None:
            removed.append(before)
        if after is not None:
            added.append(after)

    compare(
        None if old is None else _ready_deadline(old, ready_timeout_seconds),
        _ready_deadline(new, ready_timeout_seconds),
    )
    for turn_id in sorted(set(turn_ids)):
        compare(
            None if old is None else _stall_deadline(old, turn_id, turn_stall_seconds),
            _stall_deadline(new, turn_id, turn_stall_seconds),
        )
    return added, removed


def _ready_deadline(record: SessionRecord, ready_timeout_seconds: float) -> Deadline | None:
    facts, session = record.facts, record.session
    if session.readiness != Readiness.PROVISIONING:
        return None
    last_ready = None if facts.last_ready is None else facts.last_ready.occurred_at
    since = session.created_at
    if last_ready is not None:
        since = min(
            e.occurred_at for e in (facts.runtime, facts.scope) if e and _after(e, last_ready)
        )
    at = since + timedelta(seconds=ready_timeout_seconds)
    return Deadline(ChangeType.SESSION_READY_TIMEOUT, session.session_id, None, at)


def _stall_deadline(
    record: SessionRecord, turn_id: str, turn_stall_seconds: float
) -> Deadline | None:
    if turn_id not in record.summary.running:
        return None
    turn = record.turns[turn_id]
    if turn.started_at is None:
        return None
    at = turn.started_at + timedelta(seconds=turn_stall_seconds)
    return Deadline(ChangeType.TURN_STALLED, turn.session_id, turn_id, at)
