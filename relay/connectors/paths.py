"""Where a tapped request goes, and what of it goes along: pure functions, no I/O.

The tap cannot be turned toward another host. The path after `/v1/tap/{source}/` is
taken raw (as the client sent it, still percent-encoded) and refused when it could mean
anything but a path under the source's `upstream`: dot segments, empty segments
(`//host`), backslashes, encoded slashes, backslashes or dots, control characters (a
header smuggled into the request line) and a scheme (`http:`) in its first segment.
The URL built from what is left is checked again against the upstream's origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Not sent upstream as the client sent them: aiohttp sets them for the upstream request.
_REQUEST_ONLY = frozenset({"host", "content-length"})
_FORBIDDEN = re.compile(r"%(?:2f|5c|2e|00|0a|0d|09)|\\|[\x00-\x20\x7f]", re.IGNORECASE)
_CONTROL = re.compile(r"%(?:00|0a|0d)|[\x00-\x20\x7f]", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

# Where each provider's chat API names the session in its paths.
SESSION_PATHS: Mapping[str, str] = {
    "casedev": r"(?:^|/)chat/(?P<session>[^/]+)/(?:respond|stream|message|messages)(?:/|$)",
    "llamacloud": r"(?:^|/)chat/(?P<session>[^/]+)/messages/stream(?:/|$)",
    "scriberr": r"(?:^|/)chat/sessions/(?P<session>[^/:]+)/messages:stream(?:/|$)",
    "motus": r"(?:^|/)sessions/(?P<session>[^/]+)/messages(?:/|$)",
}


class UnsafePath(ValueError):
    """The path could lead off the upstream; the message says why."""


def check_upstream(url: str) -> str:
    """An upstream base URL: http(s), a host, no user, query or fragment; no trailing /."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parsed.user is not None or parsed.password is not None:
        raise ValueError("must not carry a user or password (send Authorization instead)")
    if parsed.query_string or parsed.fragment:
        raise ValueError("must not have a query or a fragment")
    return url.rstrip("/")


def upstream_url(upstream: str, raw_path: str, raw_query: str) -> URL:
    """`{upstream}/{raw_path}?{raw_query}`; raise UnsafePath if it could go elsewhere."""
    if _FORBIDDEN.search(raw_path) or _CONTROL.search(raw_query):
        raise UnsafePath("the path has an encoded slash, backslash, dot or control character")
    segments = raw_path.split("/")
    if any(s in (".", "..") for s in segments):
        raise UnsafePath("the path has a `.` or `..` segment")
    if "" in segments[:-1]:
        raise UnsafePath("the path has an empty segment (`//`)")
    if _SCHEME.match(raw_path):
        raise UnsafePath("the path must not start with a scheme (an absolute URL)")
    text = f"{upstream}/{raw_path}" + (f"?{raw_query}" if raw_query else "")
    url = URL(text, encoded=True)
    base = URL(upstream)
    if url.origin() != base.origin() or not url.raw_path.startswith(base.raw_path.rstrip("/")):
        raise UnsafePath("the path does not stay on the upstream")
    return url


def forward_headers(headers: Iterable[tuple[str, str]], request: bool) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop ones (and those `Connection` names); a request's also
    without Host and Content-Length, which belong to the upstream connection."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named | (_REQUEST_ONLY if request else frozenset())
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def session_from_path(pattern: str | None, raw_path: str) -> str | None:
    """The session id the path names by `pattern` (a regex with a `session` group)."""
    if pattern is None:
        return None
    match = re.search(pattern, raw_path)
    if match is None:
        return None
    session = unquote(match.group("session"))
    return session or None
