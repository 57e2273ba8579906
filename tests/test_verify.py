"""The signature verifier as a pure function, against third-party signers."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks
import svix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay.config import SourceSettings
from relay.sign import sign_hmac_hex, sign_standard
from relay.verify import VerificationError, Verifier, verify_signature
from tests.conftest import (
    BEARER_TOKEN,
    ED25519_KEY,
    HMAC_SECRET,
    SECOND_SECRET,
    SECRET,
    source_table,
)

BODY = b'{"id":"evt_1","type":"agent.worker.ready","data":{"chatId":"chat_1"}}'
VERIFIERS = {s["id"]: Verifier.from_settings(SourceSettings(**s)) for s in source_table()}


def _code(verifier: Verifier, body: bytes, headers: dict[str, str], now: float) -> str | None:
    try:
        verify_signature(verifier, body, CIMultiDict(headers), now)
    except VerificationError as exc:
        return exc.code
    return None


def _standard_headers(
    secret: str, body: bytes, msg_id: str = "msg_1", ts: int = 0
) -> dict[str, str]:
    ts = ts or int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(secret, msg_id, ts, body),
    }


def test_standardwebhooks_library_signature_is_accepted() -> None:
    """A signature made by the standardwebhooks library verifies."""
    now = datetime.now(UTC)
    signature = standardwebhooks.Webhook(SECRET).sign("msg_std", now, BODY.decode())
    headers = {
        "webhook-id": "msg_std",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) is None


def test_svix_library_signature_is_accepted_with_svix_prefix() -> None:
    """A signature made by the svix library verifies under the svix- header prefix."""
    now = datetime.now(UTC)
    signature = svix.Webhook(SECRET).sign("msg_svix", now, BODY.decode())
    headers = {
        "svix-id": "msg_svix",
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": signature,
    }
    assert _code(VERIFIERS["svix"], BODY, headers, time.time()) is None
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) == "MISSING_SIGNATURE"


def test_ed25519_v1a_signature_is_accepted() -> None:
    """A v1a ed25519 signature made with cryptography verifies against a whpk_ key."""
    ts = int(time.time())
    signed = b"msg_ed.%d.%s" % (ts, BODY)
    signature = "v1a," + base64.b64encode(ED25519_KEY.sign(signed)).decode()
    headers = {"webhook-id": "msg_ed", "webhook-timestamp": str(ts), "webhook-signature": signature}
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) is None
    tampered = BODY.replace(b"chat_1", b"chat_2")
    assert _code(VERIFIERS["casedev"], tampered, headers, time.time()) == "INVALID_SIGNATURE"


@pytest.mark.parametrize("secret", [SECRET, SECOND_SECRET])
def test_either_of_two_secrets_is_accepted(secret: str) -> None:
    """With two configured secrets (rotation), a signature by either verifies."""
    assert _code(VERIFIERS["casedev"], BODY, _standard_headers(secret, BODY), time.time()) is None


def test_one_matching_signature_among_several_is_enough() -> None:
    """A signature header listing an unknown and a valid signature verifies."""
    headers = _standard_headers(SECRET, BODY)
    other = "whsec_" + base64.b64encode(b"unknown key unknown key").decode()
    wrong = sign_standard(other, "msg_1", int(headers["webhook-timestamp"]), BODY)
    headers["webhook-signature"] = f"{wrong} v2,abc {headers['webhook-signature']}"
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) is None


def test_unknown_secret_is_rejected() -> None:
    """A signature by a secret that is not configured is INVALID_SIGNATURE."""
    other = "whsec_" + base64.b64encode(b"unknown key unknown key").decode()
    headers = _standard_headers(other, BODY)
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) == "INVALID_SIGNATURE"


@pytest.mark.parametrize("skew", [-301, 301])
def test_timestamp_outside_tolerance_is_rejected(skew: int) -> None:
    """A correctly signed request older or newer than the tolerance is rejected."""
    now = time.time()
    headers = _standard_headers(SECRET, BODY, ts=int(now) + skew)
    assert _code(VERIFIERS["casedev"], BODY, headers, now) == "TIMESTAMP_OUT_OF_TOLERANCE"
    headers = _standard_headers(SECRET, BODY, ts=int(now) + (299 if skew > 0 else -299))
    assert _code(VERIFIERS["casedev"], BODY, headers, now) is None


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_standard_header_is_missing_signature(missing: str) -> None:
    """Each of the three Standard Webhooks headers is required."""
    headers = _standard_headers(SECRET, BODY)
    del headers[missing]
    assert _code(VERIFIERS["casedev"], BODY, headers, time.time()) == "MISSING_SIGNATURE"


def test_hmac_sha256_over_body() -> None:
    """GitHub-style `sha256=<hex>` over the body verifies; a wrong one does not."""
    good = {"X-Hub-Signature-256": "sha256=" + sign_hmac_hex(HMAC_SECRET, BODY)}
    assert _code(VERIFIERS["github"], BODY, good, time.time()) is None
    bad = {"X-Hub-Signature-256": "sha256=" + sign_hmac_hex("other", BODY)}
    assert _code(VERIFIERS["github"], BODY, bad, time.time()) == "INVALID_SIGNATURE"
    assert _code(VERIFIERS["github"], BODY, {}, time.time()) == "MISSING_SIGNATURE"


def test_hmac_sha256_with_timestamp() -> None:
    """Vault-style HMAC over `{timestamp}.{body}` verifies and enforces the tolerance."""
    now = int(time.time())
    headers = {
        "X-Case-Signature": sign_hmac_hex(HMAC_SECRET, BODY, now),
        "X-Case-Timestamp": str(now),
    }
    assert _code(VERIFIERS["vault"], BODY, headers, now) is None
    assert _code(VERIFIERS["vault"], BODY, headers, now + 1000) == "TIMESTAMP_OUT_OF_TOLERANCE"
    unsigned_stamp = {"X-Case-Signature": sign_hmac_hex(HMAC_SECRET, BODY)}
    assert _code(VERIFIERS["vault"], BODY, unsigned_stamp, now) == "MISSING_SIGNATURE"


def test_bearer_token() -> None:
    """Bearer sources accept only a configured token."""
    ok = {"Authorization": f"Bearer {BEARER_TOKEN}"}
    assert _code(VERIFIERS["motus"], BODY, ok, time.time()) is None
    wrong = {"Authorization": "Bearer nope"}
    assert _code(VERIFIERS["motus"], BODY, wrong, time.time()) == "INVALID_SIGNATURE"
    assert _code(VERIFIERS["motus"], BODY, {}, time.time()) == "MISSING_SIGNATURE"


_header_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(sorted(VERIFIERS)),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
                "svix-id",
                "svix-timestamp",
                "svix-signature",
                "X-Hub-Signature-256",
                "X-Case-Signature",
                "X-Case-Timestamp",
                "Authorization",
            ]
        ),
        _header_text,
    ),
    body=st.binary(max_size=200),
)
def test_random_input_only_returns_or_raises_verification_error(
    source: str, headers: dict[str, str], body: bytes
) -> None:
    """Random headers and bodies never make the verifier fail in any other way."""
    if source == "open":
        return
    with pytest.raises(VerificationError) as raised:
        verify_signature(VERIFIERS[source], body, CIMultiDict(headers), time.time())
    assert raised.value.code in {
        "MISSING_SIGNATURE",
        "INVALID_SIGNATURE",
        "TIMESTAMP_OUT_OF_TOLERANCE",
    }


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200),
    other=st.binary(max_size=200),
    msg_id=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=20),
    secret=st.sampled_from([SECRET, SECOND_SECRET]),
)
def test_signature_never_accepts_a_different_body(
    body: bytes, other: bytes, msg_id: str, secret: str
) -> None:
    """A valid signature verifies its own body and no other."""
    headers = _standard_headers(secret, body, msg_id=msg_id)
    assert _code(VERIFIERS["casedev"], body, headers, time.time()) is None
    if other != body:
        assert _code(VERIFIERS["casedev"], other, headers, time.time()) == "INVALID_SIGNATURE"
