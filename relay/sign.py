"""Signing with the Standard Webhooks scheme (used by `relay send` and outbound webhooks)."""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}` with a `whsec_` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign_hmac_hex(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """Hex HMAC-SHA256 over the body, or over `{timestamp}.{body}`."""
    signed = body if timestamp is None else b"%d.%s" % (timestamp, body)
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
