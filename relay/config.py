"""Configuration: a TOML file, overridden by `RELAY_`-prefixed environment variables.

Nested settings are reached with a double underscore (`RELAY_SERVER__PORT=9000`); lists
and tables may be given as JSON (`RELAY_SOURCES='[...]'`). Any secret may be written as
`env:VAR_NAME` to read it from the environment at start-up.
"""

from __future__ import annotations

import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.errors import field_problem
from relay.providers.mapping import MappingSettings

DEFAULT_CONFIG_PATH = Path("config/relay.toml")


class ConfigError(Exception):
    """The configuration cannot be loaded; the message says which key and why."""


def resolve_secret(value: str) -> str:
    """Return the value of an `env:VAR` reference, or the value itself."""
    if not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    try:
        return os.environ[name]
    except KeyError:
        raise ValueError(f"environment variable {name!r} is not set") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VerifyScheme(StrEnum):
    STANDARD_WEBHOOKS = "standard-webhooks"
    HMAC_SHA256 = "hmac-sha256"
    BEARER = "bearer"
    NONE = "none"


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    shutdown_timeout_seconds: float = Field(10.0, ge=0)
    # A connection with no request in progress for this long is closed: an idle keep-alive
    # connection, or one whose request headers have not all arrived in that time.
    idle_timeout_seconds: float = Field(30.0, gt=0)


class StoreSettings(_Section):
    url: str = "sqlite:///data/relay.db"
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    batch_max: int = Field(1024, ge=1)
    busy_timeout_ms: int = Field(5000, ge=0)
    auto_migrate: bool = True
    # "process": ingest writes and state derivation run in a writer process of their own
    # (its own interpreter and core); "thread": on a thread of the relay's process.
    writer: Literal["process", "thread"] = "process"
    # With the writer process, how often the relay copies the WAL into the database file.
    checkpoint_interval_seconds: float = Field(0.2, gt=0)
    # A store on a server (PostgreSQL): a connection attempt or a statement that takes
    # longer fails, so that a server cut off by a silent network answers 503, not never.
    timeout_seconds: float = Field(10.0, gt=0)
    # The memory the writer's cache of session facts may take, in bytes (estimated from
    # each session's turn count); the least recently used sessions leave it past that.
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("store.url must be sqlite:///PATH or postgresql://...")
        return url


class AuthSettings(_Section):
    enabled: bool = True


class SourceSettings(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    provider: Literal[
        "casedev", "generic", "motus", "llamacloud", "scriberr", "casey", "mapping"
    ] = "generic"
    mapping: MappingSettings | None = None  # provider "mapping": where each field is
    verify: VerifyScheme = VerifyScheme.STANDARD_WEBHOOKS
    header_prefix: str = "webhook-"
    secrets: tuple[str, ...] = ()
    tolerance_seconds: int = Field(300, ge=1)
    signature_header: str = "X-Signature"
    signature_prefix: str = "sha256="
    timestamp_header: str | None = None
    # Tap: `/v1/tap/{id}/{path}` forwards to `{upstream}/{path}` (see docs/providers.md).
    upstream: str | None = None
    tap_session_pattern: str | None = None  # a regex with a `session` group; else per provider
    # Follow: a session's stream, `{session_id}` in the URL template.
    follow_url: str | None = None
    # Sent with every follow request: a table of header names to values (env:VAR allowed).
    follow_headers: tuple[tuple[str, str], ...] = ()
    follow_auto: bool = False  # follow each new session of this source
    follow_idle_seconds: float = Field(300.0, gt=0)  # no frame this long: the follow stops
    follow_backoff_seconds: float = Field(1.0, gt=0)  # first wait after a failure (doubles)
    follow_backoff_max_seconds: float = Field(60.0, gt=0)

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, url: str | None) -> str | None:
        from relay.connectors.paths import check_upstream

        return None if url is None else check_upstream(url)

    @field_validator("tap_session_pattern")
    @classmethod
    def _session_pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"is not a regular expression: {exc}") from None
            if "session" not in compiled.groupindex:
                raise ValueError("needs a named group `session`: (?P<session>...)")
        return pattern

    @field_validator("follow_url")
    @classmethod
    def _follow_template(cls, url: str | None) -> str | None:
        from relay.connectors.paths import check_upstream

        if url is None:
            return None
        if "{session_id}" not in url:
            raise ValueError("must contain {session_id}")
        check_upstream(url.replace("{session_id}", "session"))
        return url

    @field_validator("follow_headers", mode="before")
    @classmethod
    def _headers_table(cls, headers: Any) -> Any:
        return tuple(headers.items()) if isinstance(headers, dict) else headers

    @field_validator("follow_headers")
    @classmethod
    def _resolve_follow_headers(
        cls, headers: tuple[tuple[str, str], ...]
    ) -> tuple[tuple[str, str], ...]:
        return tuple((name, resolve_secret(value)) for name, value in headers)

    @model_validator(mode="after")
    def _follow_auto_needs_url(self) -> SourceSettings:
        if self.follow_auto and self.follow_url is None:
            raise ValueError("follow_auto needs follow_url")
        return self

    @field_validator("secrets")
    @classmethod
    def _resolve_secrets(cls, secrets: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(resolve_secret(s) for s in secrets)

    @model_validator(mode="after")
    def _mapping_fits_provider(self) -> SourceSettings:
        if self.provider == "mapping" and self.mapping is None:
            raise ValueError('provider = "mapping" needs a [sources.mapping] table')
        if self.provider != "mapping" and self.mapping is not None:
            raise ValueError('[sources.mapping] is only read with provider = "mapping"')
        return self

    @model_validator(mode="after")
    def _secrets_fit_scheme(self) -> SourceSettings:
        # No secrets: `relay serve` generates one into the data directory on first start.
        if self.verify is VerifyScheme.STANDARD_WEBHOOKS:
            from relay.verify import parse_standard_secret

            for secret in self.secrets:
                parse_standard_secret(secret)
        return self


class DeliverySettings(_Section):
    timeout_seconds: float = Field(15.0, gt=0)
    retry_schedule_seconds: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    allow_private_networks: bool = False
    # Base64 of 32 bytes for encrypting subscription secrets at rest; when unset, a key
    # is generated into the store's directory with mode 0600.
    encryption_key: str | None = None
    disable_after_seconds: float = Field(5 * 86400, gt=0)  # continuous failure disables
    rotation_overlap_seconds: float = Field(86400, ge=0)  # the old secret signs this long
    poll_interval_seconds: float = Field(1.0, gt=0)  # safety net besides the hub's wake-ups
    # A claimed delivery is leased to its instance for timeout_seconds plus this; another
    # instance takes over a dead one's deliveries once their lease ends. It must exceed
    # the instances' clock differences and the time to write a result.
    lease_margin_seconds: float = Field(60.0, gt=0)
    shutdown_grace_seconds: float = Field(2.0, ge=0)  # in-flight attempts may finish
    # The dashboard's public address: Slack and PagerDuty messages link to the session.
    dashboard_url: str | None = None

    @field_validator("encryption_key")
    @classmethod
    def _resolve_key(cls, key: str | None) -> str | None:
        return None if key is None else resolve_secret(key)


class AlertSettings(_Section):
    turn_stall_seconds: float = Field(600.0, gt=0)
    ready_timeout_seconds: float = Field(120.0, gt=0)
    check_interval_seconds: float = Field(1.0, gt=0)


class SSESettings(_Section):
    heartbeat_seconds: float = Field(15.0, gt=0)
    retry_ms: int = Field(3000, ge=0)
    buffer_changes: int = Field(1000, ge=1)  # held for a stream while it replays history
    buffer_bytes: int = Field(1024 * 1024, ge=1024)  # unsent bytes a live stream may hold
    # Caps the kernel's send buffer per stream (it grows to 4 MiB by default), so that a
    # stalled client holds little memory anywhere and is noticed, and cut off, sooner.
    socket_send_buffer_bytes: int = Field(128 * 1024, ge=4096)
    # How often open streams are checked against revoked API keys (a revoked key's
    # streams end within about this long).
    key_check_seconds: float = Field(2.0, gt=0)


class RetentionSettings(_Section):
    days: float = Field(30.0, ge=0)  # events, changes and attempts older are pruned; 0: never
    seconds: float | None = Field(None, gt=0)  # instead of days, for a retention under a day
    batch_rows: int = Field(500, ge=1)  # at most this many rows per table and batch
    batch_pause_seconds: float = Field(0.1, ge=0)  # between batches while there is more
    interval_seconds: float = Field(60.0, gt=0)  # between passes once nothing is left

    @property
    def keep_seconds(self) -> float | None:
        """How long what is received is kept; None to keep everything."""
        if self.seconds is not None:
            return self.seconds
        return self.days * 86400 if self.days else None


class HubSettings(_Section):
    # "memory://": in this process only (embedded mode); "redis://host:port/db" (or
    # "rediss://") carries changes and wake-ups to every relay instance.
    url: str = "memory://"
    prefix: str = Field("relay", pattern=r"^[A-Za-z0-9._:-]{1,64}$")  # of channel names
    catch_up_interval_seconds: float = Field(1.0, gt=0)  # reads the store besides Redis
    # How long a commit that arrives before a lower one waits for it before the missing
    # ids are read from the store.
    gap_wait_seconds: float = Field(0.02, ge=0)
    publish_queue: int = Field(10_000, ge=1)  # commits waiting for Redis; more are dropped

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("memory://", "redis://", "rediss://")):
            raise ValueError("hub URLs are memory:// or redis://host:port/db (rediss:// too)")
        return url


class ConnectorSettings(_Section):
    tap_queue_frames: int = Field(4096, ge=1)  # frames a tapped stream may hold unstored
    # Bytes a tapped stream may hold unread (frames are read when the process has time);
    # beyond, the tap reads them as they pass.
    tap_queue_bytes: int = Field(1024 * 1024, ge=1)
    tap_batch_frames: int = Field(256, ge=1)  # frames stored per transaction, at most
    tap_text_delay_seconds: float = Field(0.5, ge=0, le=60)  # text frames wait for more, at most
    follow_lease_seconds: float = Field(15.0, gt=0)  # a follow's instance renews its claim
    follow_poll_seconds: float = Field(1.0, gt=0)  # how often follows are claimed
    upstream_connect_timeout_seconds: float = Field(10.0, gt=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    requests: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    auth: AuthSettings = AuthSettings()
    sources: tuple[SourceSettings, ...] = ()
    delivery: DeliverySettings = DeliverySettings()
    alerts: AlertSettings = AlertSettings()
    sse: SSESettings = SSESettings()
    hub: HubSettings = HubSettings()
    log: LogSettings = LogSettings()
    retention: RetentionSettings = RetentionSettings()
    connectors: ConnectorSettings = ConnectorSettings()

    @field_validator("sources")
    @classmethod
    def _unique_source_ids(cls, sources: tuple[SourceSettings, ...]) -> tuple[SourceSettings, ...]:
        seen: set[str] = set()
        for source in sources:
            if source.id in seen:
                raise ValueError(f"source id {source.id!r} is configured twice")
            seen.add(source.id)
        return sources

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return env_settings, init_settings


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from a TOML file (optional), the environment and explicit overrides."""
    if path is None and "RELAY_CONFIG" in os.environ:
        path = os.environ["RELAY_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None


def describe_validation_error(exc: ValidationError, path: Path | str | None) -> str:
    where = f"config file {path}" if path else "configuration"
    lines = [f"invalid {where}:"]
    for error in exc.errors():
        lines.append(f"  {field_problem(error, '(top level)')}")
    return "\n".join(lines)
