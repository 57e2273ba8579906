"""API keys: random bearer tokens stored as SHA-256 hashes, each with a set of scopes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from aiohttp import web

from relay.errors import ApiError
from relay.store import ApiKey, Store
from relay.timefmt import format_time, utcnow

READ = "agent:read"
WRITE = "agent:write"
SCOPES = (READ, WRITE)
KEY_PREFIX = "rk_"


# The key a request was authorised with (absent when auth is disabled).
API_KEY = web.RequestKey("api_key", ApiKey)


@dataclass(frozen=True, slots=True)
class NewKey:
    key: ApiKey
    secret: str


def hash_key(secret: str) -> str:
    # Keys carry 256 random bits, so a fast hash is as strong as a slow one here.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_key(name: str, scopes: tuple[str, ...]) -> NewKey:
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be chosen from {', '.join(SCOPES)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id="key_" + secrets.token_hex(6),
        name=name,
        scopes=tuple(sorted(set(scopes))),
        created_at=format_time(utcnow()),
    )
    return NewKey(key, secret)


async def create_key(store: Store, name: str, scopes: tuple[str, ...]) -> NewKey:
    made = new_key(name, scopes)
    await store.add_api_key(made.key, hash_key(made.secret))
    return made


async def bootstrap_key(store: Store) -> NewKey | None:
    """Create an admin key when the store has none at all (first start); of relays that
    start together on one store, one creates it."""
    if await store.list_api_keys():
        return None
    made = new_key("bootstrap admin", SCOPES)
    return made if await store.add_first_api_key(made.key, hash_key(made.secret)) else None


def presented_key(request: web.Request, query_token: bool = False) -> str | None:
    """The key in `Authorization: Bearer`, or with `query_token` in `?access_token=` (for
    event streams, which a browser's EventSource opens without headers)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return (request.query.get("access_token") or None) if query_token else None


async def authorize(
    store: Store, request: web.Request, scope: str, query_token: bool = False
) -> ApiKey:
    secret = presented_key(request, query_token)
    key = await store.find_api_key(hash_key(secret)) if secret else None
    if key is None or key.revoked_at is not None:
        message = "a valid API key is required (Authorization: Bearer)"
        if not query_token and "access_token" in request.query:
            message += "; ?access_token= is accepted only on event streams"
        raise ApiError(401, "UNAUTHORIZED", message)
    if scope not in key.scopes:
        raise ApiError(403, "FORBIDDEN", f"this API key lacks the {scope} scope")
    request[API_KEY] = key
    return key
