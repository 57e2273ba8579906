"""The Redis hub's message: one commit, as one instance sends it to the others.

A JSON header line, then the changes' bodies back to back (their exact bytes, as the
log holds them): `{"o": origin, "s": {session: version}, "c": [[id, type, session,
turn, body length], ...]}`. A commit too large to carry whole goes without its changes,
as `"r": last id`; receivers read those from the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from relay.changes import Commit, StoredChange


class BadMessage(ValueError):
    """A message that is not a commit in this format."""


@dataclass(frozen=True, slots=True)
class Message:
    origin: str  # the sending hub's id
    commit: Commit
    through: int | None = None  # set when the changes up to this id were left out


def encode(origin: str, commit: Commit, max_bytes: int) -> bytes:
    """The message for `commit`; without its changes when their bodies exceed `max_bytes`."""
    header: dict[str, Any] = {"o": origin, "s": dict(commit.sessions)}
    size = sum(len(change.body) for change in commit.changes)
    if size > max_bytes:
        header["r"] = commit.changes[-1].id
        return orjson.dumps(header) + b"\n"
    header["c"] = [[c.id, c.type, c.session_id, c.turn_id, len(c.body)] for c in commit.changes]
    return orjson.dumps(header) + b"\n" + b"".join(c.body for c in commit.changes)


def sent_by(origin: str) -> bytes:
    """How every message that `origin` encodes begins (so that its own are known unread)."""
    return orjson.dumps({"o": origin})[:-1] + b","


def decode(data: bytes) -> Message:
    """The commit a message carries; BadMessage if it is not one."""
    head, newline, rest = data.partition(b"\n")
    try:
        header = orjson.loads(head)
        origin, sessions = header["o"], header["s"]
        if not newline or not isinstance(origin, str) or not isinstance(sessions, dict):
            raise BadMessage("no origin or sessions")
        if "r" in header:
            return Message(origin, Commit([], sessions), _id(header["r"]))
        changes, offset = [], 0
        for change_id, kind, session_id, turn_id, length in header["c"]:
            body = rest[offset : offset + length]
            offset += length
            changes.append(StoredChange(_id(change_id), kind, session_id, turn_id, body))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadMessage(str(exc)) from None
    if offset != len(rest):
        raise BadMessage("the bodies do not match their lengths")
    return Message(origin, Commit(changes, sessions))


def _id(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadMessage(f"not a change id: {value!r}")
    return value
