"""A subscription's static headers: which names it may set, and their values at send time."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from relay.config import resolve_secret

MAX_HEADERS = 20
MAX_VALUE = 4096
# Hop-by-hop and framing headers, and those relay sets itself (the signature above all).
REFUSED = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "expect",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "webhook-id",
        "webhook-signature",
        "webhook-timestamp",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")


def check_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers as (name, value) pairs, or ValueError saying which one is refused."""
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    seen: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if _TOKEN.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a valid header name")
        if lower in REFUSED or lower.startswith("sec-"):
            raise ValueError(f"the header {name!r} is set by relay or the connection")
        if lower in seen:
            raise ValueError(f"the header {name!r} is given twice")
        seen.add(lower)
        if len(value) > MAX_VALUE or any(ch in value for ch in "\r\n\0"):
            raise ValueError(f"the value of {name!r} must be one line of at most {MAX_VALUE}")
        if value.startswith("env:") and not value.removeprefix("env:"):
            raise ValueError(f"the value of {name!r} names no environment variable")
    return list(headers.items())


def resolve_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The headers with `env:VAR` values read from the environment now; ValueError names
    a variable that is not set."""
    resolved = {}
    for name, value in headers:
        try:
            resolved[name] = resolve_secret(value)
        except ValueError as exc:
            raise ValueError(f"header {name}: {exc}") from None
        if any(ch in resolved[name] for ch in "\r\n\0"):
            raise ValueError(f"header {name}: the value from the environment is not one line")
    return resolved
