"""The outbound request for one change, signed as a Standard Webhook."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from relay import __version__
from relay.sign import sign_standard
from relay.timefmt import format_time


def webhook_request(
    change_id: int, change_type: str, change_body: bytes, secrets: Sequence[str], now: float
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for delivering a change.

    `webhook-id` is `msg_<change id>`, the same on every retry. Every secret in
    `secrets` signs (during a rotation both the old and the new one do), so receivers
    holding either verify.
    """
    msg_id = f"msg_{change_id}"
    timestamp = int(now)
    body = b'{"type":%s,"timestamp":%s,"data":%s}' % (
        orjson.dumps(change_type),
        orjson.dumps(format_time(datetime.fromtimestamp(now, UTC))),
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
