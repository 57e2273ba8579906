"""Subscription secrets: made as `whsec_` keys, kept encrypted at rest with AES-256-GCM."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_FILE = "secret.key"
_NONCE = 12


class SecretBoxError(Exception):
    """The encryption key is unusable, or a stored secret does not decrypt with it."""


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks signing secret (24 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class SecretBox:
    """Encrypts and decrypts secrets; each ciphertext is bound to its row's id."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretBoxError("the encryption key must be 32 bytes (base64 of 32 bytes)")
        self._aead = AESGCM(key)

    @classmethod
    def from_config(cls, configured: str | None, data_dir: Path) -> SecretBox:
        """The configured key (base64), else one kept in the data directory, made if absent.

        A key made here is written with mode 0600; an existing key file that others can
        read is refused rather than trusted.
        """
        if configured:
            return cls(_decode_key(configured))
        path = data_dir / KEY_FILE
        if path.exists():
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SecretBoxError(f"{path} must be readable by its owner only (chmod 600)")
            return cls(_decode_key(path.read_text().strip()))
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        # Written whole under a name of its own, then linked into place: relays starting
        # together on one data directory (cluster mode) all end up with the first key.
        partial = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(base64.b64encode(key).decode() + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.link(partial, path)
        except FileExistsError:
            return cls(_decode_key(path.read_text().strip()))
        finally:
            partial.unlink(missing_ok=True)
        return cls(key)

    def encrypt(self, plaintext: str, bound_to: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), bound_to.encode())

    def decrypt(self, blob: bytes, bound_to: str) -> str:
        try:
            plain = self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], bound_to.encode())
        except Exception:
            raise SecretBoxError("a stored secret does not decrypt with this key") from None
        return plain.decode()


def _decode_key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise SecretBoxError("the encryption key must be base64 of 32 bytes") from None
