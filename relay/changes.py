"""Committed changes as the store hands them to the fan-out: encoded once, with their ids."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

DEFAULT_TYPES = ("*",)


@dataclass(frozen=True, slots=True)
class StoredChange:
    id: int
    type: str
    session_id: str
    turn_id: str | None
    body: bytes  # the change object as JSON (one line), exactly as subscribers receive it
    frame: bytes = b""  # the same as one Server-Sent Events frame
    chunk: bytes = b""  # the frame framed as one HTTP/1.1 chunk

    @classmethod
    def of(
        cls, change_id: int, change_type: str, session_id: str, turn_id: str | None, body: bytes
    ) -> StoredChange:
        """A change with its SSE frame encoded once, for every subscriber to share."""
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (change_id, change_type.encode(), body)
        return cls(change_id, change_type, session_id, turn_id, body, frame, as_chunk(frame))


def as_chunk(data: bytes) -> bytes:
    """`data` as one chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Commit:
    """What one committed transaction produced."""

    changes: list[StoredChange] = field(default_factory=list)
    sessions: Mapping[str, int] = field(default_factory=dict)  # session id -> version


@lru_cache(maxsize=256)
def glob_pattern(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression matching any of the exact names or globs (`turn.*`)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs or DEFAULT_TYPES))


def split_list(values: Iterable[str]) -> tuple[str, ...]:
    """Query values that may repeat and may hold comma-separated lists."""
    return tuple(part for value in values for part in value.split(",") if part)
