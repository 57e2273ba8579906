"""RFC 3339 timestamps as the relay writes them: UTC, milliseconds, a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache


@lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """Cached: the same moments (a session's created_at, a turn's start) recur often."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def format_unix(seconds: float) -> str:
    """A unix time (seconds) as the relay writes times."""
    return format_time(datetime.fromtimestamp(seconds, UTC))


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
