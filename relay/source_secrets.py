"""Signing secrets generated for sources that have none configured.

No configuration shipped with relay carries a usable secret. A source that verifies
signatures but has no `secrets` gets one generated on the relay's first start, kept in
the data directory (next to the store, mode 0600) so that restarts and `relay send`
use the same one. A platform's real secret is configured instead, as `env:VAR`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import orjson

from relay.config import Settings, SourceSettings, VerifyScheme
from relay.store import data_directory
from relay.webhooks.secrets import new_webhook_secret

FILE_NAME = "source-secrets.json"


class SourceSecretsError(Exception):
    """The generated secrets file is unusable; the message says why and what to do."""


def data_dir(settings: Settings) -> Path:
    """Where the relay keeps its own files (see `store.data_directory`)."""
    return data_directory(settings.store.url)


def secrets_path(settings: Settings) -> Path:
    return data_dir(settings) / FILE_NAME


def needs_secret(source: SourceSettings) -> bool:
    return source.verify is not VerifyScheme.NONE and not source.secrets


def new_secret(scheme: VerifyScheme) -> str:
    """A fresh secret in the form the scheme expects."""
    if scheme is VerifyScheme.STANDARD_WEBHOOKS:
        return new_webhook_secret()
    return secrets.token_urlsafe(32)


def read_secrets(path: Path) -> dict[str, str]:
    """Source id -> generated secret; empty when the file does not exist yet."""
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SourceSecretsError(f"{path} must be readable by its owner only (chmod 600)")
        loaded = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError:
        raise SourceSecretsError(
            f"{path} is not valid JSON (delete it to generate new secrets)"
        ) from None
    if not isinstance(loaded, dict):
        raise SourceSecretsError(f"{path} must hold a JSON object of source id -> secret")
    return {str(k): str(v) for k, v in loaded.items()}


def _write_secrets(path: Path, stored: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(stored, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)


def with_secrets(settings: Settings, stored: dict[str, str]) -> Settings:
    """`settings` with each source that has no secret given its stored one, if any."""
    sources = tuple(
        source.model_copy(update={"secrets": (stored[source.id],)})
        if needs_secret(source) and source.id in stored
        else source
        for source in settings.sources
    )
    return settings.model_copy(update={"sources": sources})


def provision(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """Give every source without a secret its stored one, generating those missing.

    Returns the completed settings and the secrets generated now (to be shown once).
    """
    missing = [s for s in settings.sources if needs_secret(s)]
    if not missing:
        return settings, {}
    path = secrets_path(settings)
    with _exclusive(path):
        stored = read_secrets(path)
        generated = {s.id: new_secret(s.verify) for s in missing if s.id not in stored}
        if generated:
            stored = {**stored, **generated}
            _write_secrets(path, stored)
    return with_secrets(settings, stored), generated


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Held while the secrets file is read and completed: relays that start together on
    one data directory (cluster mode) generate each source's secret once, and share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def stored_settings(settings: Settings) -> Settings:
    """`settings` completed with the secrets a relay generated earlier (never generates)."""
    if not any(needs_secret(s) for s in settings.sources):
        return settings
    return with_secrets(settings, read_secrets(secrets_path(settings)))
