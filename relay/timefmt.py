"""RFC 3339 timestamps as the relay writes them: UTC, milliseconds, a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime


def format_time(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
