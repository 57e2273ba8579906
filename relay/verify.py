"""Signature verification: a pure function over (verifier, raw body, headers, now).

It returns None when the request is authentic and raises `VerificationError`, carrying
the error code of the ingest contract, otherwise. It never parses the body.
"""

from __future__ import annotations

import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.config import SourceSettings, VerifyScheme
from relay.sign import HmacSha256

MISSING_SIGNATURE = "MISSING_SIGNATURE"
INVALID_SIGNATURE = "INVALID_SIGNATURE"
TIMESTAMP_OUT_OF_TOLERANCE = "TIMESTAMP_OUT_OF_TOLERANCE"
# The most `v1`/`v1a` entries one signature header may carry: each may cost a full
# verification of the body, before the sender is known to be anyone.
MAX_SIGNATURE_ENTRIES = 8


class VerificationError(Exception):
    """The request is not authentic; `code` is the ingest error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Verifier:
    """Everything needed to verify one source's requests, decoded once at start-up."""

    scheme: VerifyScheme
    header_prefix: str = "webhook-"
    hmac_keys: tuple[HmacSha256, ...] = ()
    public_keys: tuple[Ed25519PublicKey, ...] = ()
    tokens: tuple[bytes, ...] = ()
    tolerance_seconds: int = 300
    signature_header: str = "X-Signature"
    signature_prefix: str = "sha256="
    timestamp_header: str | None = None
    standard_headers: tuple[str, ...] = ("webhook-id", "webhook-timestamp", "webhook-signature")

    @classmethod
    def from_settings(cls, source: SourceSettings) -> Verifier:
        hmac_keys: list[HmacSha256] = []
        public_keys: list[Ed25519PublicKey] = []
        if source.verify is VerifyScheme.STANDARD_WEBHOOKS:
            for secret in source.secrets:
                key = parse_standard_secret(secret)
                if isinstance(key, Ed25519PublicKey):
                    public_keys.append(key)
                else:
                    hmac_keys.append(HmacSha256(key))
        elif source.verify is VerifyScheme.HMAC_SHA256:
            hmac_keys = [HmacSha256(s.encode()) for s in source.secrets]
        return cls(
            scheme=source.verify,
            header_prefix=source.header_prefix,
            hmac_keys=tuple(hmac_keys),
            public_keys=tuple(public_keys),
            tokens=tuple(s.encode() for s in source.secrets)
            if source.verify is VerifyScheme.BEARER
            else (),
            tolerance_seconds=source.tolerance_seconds,
            signature_header=source.signature_header,
            signature_prefix=source.signature_prefix,
            timestamp_header=source.timestamp_header,
            standard_headers=tuple(
                source.header_prefix + name for name in ("id", "timestamp", "signature")
            ),
        )


def parse_standard_secret(secret: str) -> bytes | Ed25519PublicKey:
    """Decode a Standard Webhooks secret: `whsec_<b64>` (HMAC) or `whpk_<b64>` (ed25519)."""
    if secret.startswith("whpk_"):
        raw = _b64decode(secret.removeprefix("whpk_"))
        if raw is None or len(raw) != 32:
            raise ValueError("a whpk_ secret must be 32 bytes of base64 (an ed25519 public key)")
        return Ed25519PublicKey.from_public_bytes(raw)
    key = _b64decode(secret.removeprefix("whsec_"))
    if not key:
        raise ValueError("a standard-webhooks secret must be whsec_ followed by base64")
    return key


def verify_signature(
    verifier: Verifier, body: bytes, headers: Mapping[str, str], now: float
) -> None:
    """Check a request's signature; `headers` must look names up case-insensitively."""
    match verifier.scheme:
        case VerifyScheme.STANDARD_WEBHOOKS:
            _verify_standard(verifier, body, headers, now)
        case VerifyScheme.HMAC_SHA256:
            _verify_hmac(verifier, body, headers, now)
        case VerifyScheme.BEARER:
            _verify_bearer(verifier, headers)
        case VerifyScheme.NONE:
            return


def _verify_standard(
    verifier: Verifier, body: bytes, headers: Mapping[str, str], now: float
) -> None:
    id_header, timestamp_header, signature_header = verifier.standard_headers
    msg_id = headers.get(id_header)
    timestamp = headers.get(timestamp_header)
    signatures = headers.get(signature_header)
    if not (msg_id and timestamp and signatures):
        raise VerificationError(
            MISSING_SIGNATURE,
            f"headers {id_header}, {timestamp_header} and {signature_header} are required",
        )
    # Cheap checks first: no hashing or signature verification for a stale request or an
    # oversized list of candidates.
    _check_timestamp(timestamp, now, verifier.tolerance_seconds)
    entries = signatures.split()
    if len(entries) > MAX_SIGNATURE_ENTRIES:
        raise VerificationError(
            INVALID_SIGNATURE,
            f"{signature_header} carries {len(entries)} signatures; "
            f"at most {MAX_SIGNATURE_ENTRIES} are accepted",
        )
    signed = b"%s.%s.%s" % (_header_bytes(msg_id), _header_bytes(timestamp), body)
    digests = [key.digest(signed) for key in verifier.hmac_keys]
    if not _any_standard_signature_matches(entries, signed, digests, verifier.public_keys):
        raise VerificationError(INVALID_SIGNATURE, "no signature matches a configured secret")


def _any_standard_signature_matches(
    entries: list[str],
    signed: bytes,
    digests: list[bytes],
    public_keys: tuple[Ed25519PublicKey, ...],
) -> bool:
    for entry in entries:
        version, _, encoded = entry.partition(",")
        candidate = _b64decode(encoded)
        if candidate is None:
            continue
        if version == "v1":
            for digest in digests:
                if hmac.compare_digest(candidate, digest):
                    return True
        elif version == "v1a" and len(candidate) == 64:
            for key in public_keys:
                try:
                    key.verify(candidate, signed)
                except InvalidSignature:
                    continue
                return True
    return False


def _verify_hmac(verifier: Verifier, body: bytes, headers: Mapping[str, str], now: float) -> None:
    header = headers.get(verifier.signature_header)
    timestamp = headers.get(verifier.timestamp_header) if verifier.timestamp_header else None
    if not header or (verifier.timestamp_header and not timestamp):
        needed = verifier.signature_header
        if verifier.timestamp_header:
            needed += f" and {verifier.timestamp_header}"
        raise VerificationError(MISSING_SIGNATURE, f"header {needed} is required")
    if timestamp:
        _check_timestamp(timestamp, now, verifier.tolerance_seconds)
    signed = b"%s.%s" % (_header_bytes(timestamp), body) if timestamp else body
    try:
        candidate = bytes.fromhex(header.strip().removeprefix(verifier.signature_prefix))
    except ValueError:
        candidate = b""
    digests = (key.digest(signed) for key in verifier.hmac_keys)
    if not any(hmac.compare_digest(candidate, digest) for digest in digests):
        raise VerificationError(INVALID_SIGNATURE, "no signature matches a configured secret")


def _verify_bearer(verifier: Verifier, headers: Mapping[str, str]) -> None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise VerificationError(
            MISSING_SIGNATURE, "header Authorization: Bearer <token> is required"
        )
    presented = token.strip().encode("utf-8", "surrogateescape")
    if not any(hmac.compare_digest(presented, known) for known in verifier.tokens):
        raise VerificationError(INVALID_SIGNATURE, "the bearer token is not valid for this source")


def _check_timestamp(timestamp: str, now: float, tolerance: int) -> None:
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise VerificationError(INVALID_SIGNATURE, "the timestamp is not unix seconds")
    sent = int(timestamp)
    if abs(now - sent) > tolerance:
        raise VerificationError(
            TIMESTAMP_OUT_OF_TOLERANCE,
            f"the timestamp is more than {tolerance} s away from the relay's clock",
        )


def _header_bytes(value: str) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 with surrogateescape; undo that.
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise VerificationError(INVALID_SIGNATURE, "a signature header is not valid text") from None


def _b64decode(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
