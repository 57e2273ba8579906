"""Shared fixtures: a relay on a real SQLite file, served on loopback."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, settings

from relay.app import create_app
from relay.auth import NewKey
from relay.config import Settings
from tests.services import pg_url, redis_namespace

__all__ = ["pg_url", "redis_namespace"]  # fixtures for the cluster tests

# Property tests prove what they assert, not how fast a busy machine runs them: no
# per-example deadline, and no health check failing on slow data generation.
settings.register_profile("relay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("relay")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "casedev"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECOND_SECRET = "whsec_" + base64.b64encode(b"a second secret for rotation!!").decode()
ED25519_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED25519_PUBLIC = (
    "whpk_"
    + base64.b64encode(
        ED25519_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()
)
HMAC_SECRET = "hmac-shared-secret"
# The changes the fixture lifecycle produces, in order.
LIFECYCLE_CHANGES = [
    "session.created",
    "session.provisioning",  # runtime reused
    "session.provisioning",  # scope activated
    "session.ready",
    "turn.started",
    "turn.completed",
    "turn.started",
    "turn.conflict",
    "turn.failed",
]
BEARER_TOKEN = "motus-callback-token"


def fixture_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads((FIXTURES / "session_lifecycle.json").read_text())
    return events


def source_table() -> list[dict[str, Any]]:
    return [
        {
            "id": "casedev",
            "provider": "casedev",
            "verify": "standard-webhooks",
            "secrets": [SECRET, SECOND_SECRET, ED25519_PUBLIC],
        },
        {
            "id": "svix",
            "provider": "casedev",
            "verify": "standard-webhooks",
            "header_prefix": "svix-",
            "secrets": [SECRET],
        },
        {
            "id": "github",
            "provider": "generic",
            "verify": "hmac-sha256",
            "signature_header": "X-Hub-Signature-256",
            "secrets": [HMAC_SECRET],
        },
        {
            "id": "vault",
            "provider": "casedev",
            "verify": "hmac-sha256",
            "signature_header": "X-Case-Signature",
            "signature_prefix": "",
            "timestamp_header": "X-Case-Timestamp",
            "secrets": [HMAC_SECRET],
        },
        {"id": "motus", "provider": "generic", "verify": "bearer", "secrets": [BEARER_TOKEN]},
        {"id": "open", "provider": "generic", "verify": "none"},
    ]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "store": {"url": f"sqlite:///{tmp_path}/relay.db"},
        "sources": source_table(),
        "log": {"requests": False},
    }
    data.update(overrides)
    return Settings(**data)


class Relay:
    """A running relay under test: its HTTP client and the admin key made at start-up."""

    def __init__(self, client: TestClient[web.Request, web.Application], key: str) -> None:
        self.client = client
        self.key = key

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def ready(self) -> bool:
        """Whether /readyz answers 200: the store commits, through its writer process
        (started on first use, which takes seconds on a loaded machine)."""
        return (await self.client.get("/readyz")).status == 200

    async def events(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after = 0
        while True:
            resp = await self.client.get(
                "/v1/events", params={"after": after, "limit": 1000}, headers=self.auth
            )
            assert resp.status == 200
            page = await resp.json()
            items.extend(page["items"])
            if page["next_after"] is None:
                return items
            after = page["next_after"]


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> RelayFactory:
    async def start(clock: Callable[[], float] | None = None, **overrides: Any) -> Relay:
        keys: list[NewKey] = []
        settings = make_settings(tmp_path, **overrides)
        extra = {} if clock is None else {"clock": clock}
        app = create_app(settings, on_bootstrap_key=keys.append, **extra)
        try:
            client = await aiohttp_client(app)
        except BaseException:
            await app.cleanup()  # close what started, or its threads keep pytest from exiting
            raise
        return Relay(client, keys[0].secret if keys else "")

    return start


@pytest.fixture
async def relay(start_relay: RelayFactory) -> Relay:
    return await start_relay()


# -- slow tests: bounded by default, long with --soak (or RELAY_SOAK=1) ---------------------


@dataclass(frozen=True)
class Load:
    """How much the slow (crash, WAL, durability) tests push through the relay."""

    crash_events: int  # events sent while the relay is killed or stopped
    crash_kill_after: int  # acknowledged events before the kill
    wal_events: int  # ~2 KiB events written without a pause
    pending_events: int  # events whose deliveries are pending at the kill
    min_pending: int  # deliveries that must be pending at the kill


BOUNDED = Load(
    crash_events=1200, crash_kill_after=400, wal_events=8000, pending_events=600, min_pending=500
)
SOAK = Load(
    crash_events=20000,
    crash_kill_after=7000,
    wal_events=50000,
    pending_events=4000,
    min_pending=3000,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the slow tests in their long form (also RELAY_SOAK=1); default: bounded",
    )


@pytest.fixture
def load(request: pytest.FixtureRequest) -> Load:
    """The bounded load, or the soak load with --soak or RELAY_SOAK=1."""
    soak = request.config.getoption("--soak") or os.environ.get("RELAY_SOAK") == "1"
    return SOAK if soak else BOUNDED
