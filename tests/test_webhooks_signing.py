"""Outbound webhook signing and secrets at rest."""

from __future__ import annotations

import base64
import stat
import time
from pathlib import Path

import orjson
import pytest
import standardwebhooks
import svix

from relay.webhooks.secrets import SecretBox, SecretBoxError, new_webhook_secret
from relay.webhooks.signing import message_id, webhook_request

CHANGE = orjson.dumps({"id": 42, "type": "turn.completed", "session_id": "chat_1"})


def test_deliveries_verify_with_standardwebhooks_and_svix() -> None:
    """A signed delivery verifies with the standardwebhooks and the svix libraries."""
    secret = new_webhook_secret()
    body, headers = webhook_request(message_id(42), "turn.completed", CHANGE, [secret], time.time())
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "turn.completed"
    assert payload["data"]["id"] == 42
    assert headers["webhook-id"] == "msg_42"
    svix_headers = {
        "svix-id": headers["webhook-id"],
        "svix-timestamp": headers["webhook-timestamp"],
        "svix-signature": headers["webhook-signature"],
    }
    svix.Webhook(secret).verify(body, svix_headers)


def test_during_rotation_both_secrets_sign() -> None:
    """With an old and a new secret, receivers holding either one verify."""
    old, new = new_webhook_secret(), new_webhook_secret()
    body, headers = webhook_request(message_id(7), "session.ready", CHANGE, [new, old], time.time())
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(body, headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_webhook_secret()).verify(body, headers)


def test_webhook_id_is_stable_across_retries() -> None:
    """The same change gets the same webhook-id at every attempt, with a fresh timestamp."""
    msg_id = message_id(9)
    first = webhook_request(msg_id, "turn.failed", CHANGE, [new_webhook_secret()], 1_000_000.0)
    later = webhook_request(msg_id, "turn.failed", CHANGE, [new_webhook_secret()], 1_000_300.0)
    assert first[1]["webhook-id"] == later[1]["webhook-id"] == "msg_9"
    assert first[1]["webhook-timestamp"] != later[1]["webhook-timestamp"]


def test_secrets_round_trip_and_are_bound_to_their_row(tmp_path: Path) -> None:
    """Encrypted secrets decrypt for their own row only, and never appear in clear."""
    box = SecretBox.from_config(None, tmp_path)
    secret = new_webhook_secret()
    blob = box.encrypt(secret, "sub_1")
    assert secret.encode() not in blob
    assert box.decrypt(blob, "sub_1") == secret
    with pytest.raises(SecretBoxError):
        box.decrypt(blob, "sub_2")


def test_generated_key_is_private_and_reused(tmp_path: Path) -> None:
    """The key made in the data directory has mode 0600 and is loaded again next time."""
    blob = SecretBox.from_config(None, tmp_path).encrypt("whsec_x", "sub_1")
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert SecretBox.from_config(None, tmp_path).decrypt(blob, "sub_1") == "whsec_x"
    key_file.chmod(0o644)
    with pytest.raises(SecretBoxError, match="owner only"):
        SecretBox.from_config(None, tmp_path)


def test_configured_key_is_used_and_checked(tmp_path: Path) -> None:
    """A configured key (base64 of 32 bytes) is used; a wrong one is refused clearly."""
    key = base64.b64encode(bytes(range(32))).decode()
    box = SecretBox.from_config(key, tmp_path)
    assert box.decrypt(box.encrypt("s", "r"), "r") == "s"
    assert not (tmp_path / "secret.key").exists()
    with pytest.raises(SecretBoxError):
        SecretBox.from_config("c2hvcnQ=", tmp_path)
    other = SecretBox(bytes(32))
    with pytest.raises(SecretBoxError):
        other.decrypt(box.encrypt("s", "r"), "r")
