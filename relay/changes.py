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
    body: bytes  # the change object as JSON, exactly as subscribers receive it


@dataclass(frozen=True, slots=True)
class Commit:
    """What one committed transaction produced."""

    changes: list[StoredChange] = field(default_factory=list)
    sessions: Mapping[str, int] = field(default_factory=dict)  # session id -> version


@lru_cache(maxsize=256)
def _pattern(globs: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def type_filter(globs: Iterable[str]) -> re.Pattern[str]:
    """A matcher for change types: exact names or globs (`turn.*`, `*`).

    A bare `*` does not match `raw.*` types, which must be asked for by name or glob.
    """
    return _pattern(tuple(globs) or DEFAULT_TYPES)


def type_matches(pattern: re.Pattern[str], change_type: str) -> bool:
    if change_type.startswith("raw.") and pattern.pattern == _pattern(DEFAULT_TYPES).pattern:
        return False
    return pattern.fullmatch(change_type) is not None
