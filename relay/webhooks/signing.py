"""The outbound request for one change, signed as a Standard Webhook."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from relay import __version__
from relay.sign import sign_standard
from relay.timefmt import format_unix


def message_id(change_id: int) -> str:
    """The `webhook-id` of a change: the same on every attempt."""
    return f"msg_{change_id}"


def webhook_request(
    msg_id: str, change_type: str, change_body: bytes, secrets: Sequence[str], now: float
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for delivering a change (or a test event) as message `msg_id`.

    `webhook-id` is `msg_id`, the same on every retry. Every secret in
    `secrets` signs (during a rotation both the old and the new one do), so receivers
    holding either verify.
    """
    timestamp = int(now)
    body = b'{"type":%s,"timestamp":%s,"data":%s}' % (
        orjson.dumps(change_type),
        orjson.dumps(format_unix(now)),
        change_body,
    )
    signature = " ".join(sign_standard(secret, msg_id, timestamp, body) for secret in secrets)
    headers = {
        "content-type": "application/json",
        "user-agent": f"relay/{__version__}",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
    return body, headers
