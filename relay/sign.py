"""Signing with the Standard Webhooks scheme (used by `relay send` and outbound webhooks)."""

from __future__ import annotations

import base64
import hashlib
import hmac

_BLOCK = 64


class HmacSha256:
    """HMAC-SHA256 with one key, its inner and outer hash states computed once.

    Each message then costs two hash-state copies instead of an algorithm look-up,
    which is what OpenSSL 3's one-shot `hmac.digest` pays on every call.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}` with a `whsec_` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign_hmac_hex(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """Hex HMAC-SHA256 over the body, or over `{timestamp}.{body}`."""
    signed = body if timestamp is None else b"%d.%s" % (timestamp, body)
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
