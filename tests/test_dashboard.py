"""The live dashboard: its files over HTTP, and the page itself in headless Chromium."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay import auth
from relay.app import create_app
from relay.appkeys import STORE
from relay.auth import NewKey
from relay.changes import StoredChange
from relay.hub import InProcessHub, Subscription
from tests.browser import Page, needs_chromium, open_page
from tests.conftest import Relay, RelayFactory, fixture_events, make_settings
from tests.test_read_api import ingest

SESSION = "chat_01JD7Q8M2X"
EARLIER = "chat_earlier_01"


async def test_dashboard_files_are_served_without_a_key(relay: Relay) -> None:
    """The page and its assets load without an API key, typed and revalidated by ETag."""
    client = relay.client
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert page.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    html = await page.text()
    assert '<script type="module" src="/dashboard/app.js">' in html
    assert 'href="/dashboard/style.css"' in html

    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = await client.get(f"/dashboard/{name}")
        assert resp.status == 200
        assert resp.content_type == content_type
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        again = await client.get(
            f"/dashboard/{name}", headers={"If-None-Match": resp.headers["ETag"]}
        )
        assert again.status == 304
        assert await again.read() == b""

    missing = await client.get("/dashboard/secrets.txt")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "NOT_FOUND"
    # The data behind the page still needs a key.
    assert (await client.get("/v1/sessions")).status == 401


def _row(session_id: str) -> str:
    """JavaScript: what the page shows in the row of `session_id` (null when not shown)."""
    selector = json.dumps(f'tr[data-session-id="{session_id}"]')
    return f"""(() => {{
      const row = document.querySelector({selector});
      if (!row) return null;
      const cells = [...row.cells].map((td) =>
        [...td.childNodes].map((node) => node.textContent.trim()).filter(Boolean).join(" "));
      return {{
        readiness: row.querySelector('[data-kind="readiness"]').textContent,
        turn: row.querySelector('[data-kind="turn"]').textContent,
        cells,
      }};
    }})()"""


async def _shows(page: Page, session_id: str, readiness: str, turn: str) -> dict[str, Any]:
    expected = json.dumps({"readiness": readiness, "turn": turn})
    row: dict[str, Any] = await page.wait_for(
        f"""(() => {{
          const row = {_row(session_id)};
          const want = {expected};
          return row && row.readiness === want.readiness && row.turn === want.turn ? row : null;
        }})()"""
    )
    return row


@needs_chromium
async def test_dashboard_shows_a_session_lifecycle_live(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """The page lists stored sessions and follows a session live: provisioning, ready,
    running, completed; filters hide and show it."""
    relay = await start_relay()
    events = fixture_events()
    for event in events[:2]:  # a session that exists before the page opens
        earlier = json.loads(json.dumps(event).replace(SESSION, EARLIER))
        await ingest(relay, {**earlier, "id": event["id"] + "_earlier"})

    url = f"{relay.client.make_url('/')}?access_token={relay.key}"
    async with open_page(tmp_path / "chromium-profile", url) as page:
        await page.wait_for("document.getElementById('connection').dataset.state === 'live'")
        assert await page.evaluate("document.getElementById('connection-text').textContent") == (
            "Live"
        )
        assert await page.evaluate("location.search") == ""  # the key left the address bar
        await _shows(page, EARLIER, "provisioning", "idle")  # from GET /v1/sessions

        await ingest(relay, events[0])  # session created
        await _shows(page, SESSION, "provisioning", "idle")
        # Runtime reused and scope activated keep it provisioning (no change to show),
        # then the worker is ready.
        for event in events[1:4]:
            await ingest(relay, event)
        ready = await _shows(page, SESSION, "ready", "idle")
        assert ready["cells"][1] == "ready runtime reused · scope · worker"
        assert ready["cells"][2] == "2.1 s"  # time to ready
        await ingest(relay, events[4])  # turn_001 started
        running = await _shows(page, SESSION, "ready", "running")
        assert running["cells"][4].startswith("turn_001")  # the active turn
        await ingest(relay, events[5])  # turn_001 completed
        completed = await _shows(page, SESSION, "ready", "completed")
        assert completed["cells"][4].startswith("—")  # no active turn any more
        assert completed["cells"][5].startswith("turn.completed")  # the last change
        assert completed["cells"][6] == "5,932 tokens $0.0276"  # usage
        await page.wait_for("document.getAnimations().length === 0")  # no highlight fading
        png = await page.screenshot(tmp_path / "dashboard.png")

        for event in events[6:]:  # turn_002 started, turn_003 conflict, turn_002 failed
            await ingest(relay, event)
        failed = await _shows(page, SESSION, "ready", "failed")
        assert "vault search timed out" in failed["cells"][3]
        assert "3 turns · 1 completed · 1 failed · 1 conflict" in failed["cells"][4]

        choose = (
            "(() => {{ const s = document.getElementById('filter-readiness');"
            " s.value = {!r}; s.dispatchEvent(new Event('change')); return true; }})()"
        )
        await page.evaluate(choose.format("provisioning"))
        await page.wait_for(f"{_row(SESSION)} === null")
        await _shows(page, EARLIER, "provisioning", "idle")
        await page.evaluate(choose.format("ready"))
        await page.wait_for(f"{_row(EARLIER)} === null")
        await _shows(page, SESSION, "ready", "failed")

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000  # a rendered page, not a blank one


@needs_chromium
@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        ((), "did not accept this API key (401)"),
        ((auth.WRITE,), "may not read sessions (403): this API key lacks the agent:read scope"),
    ],
)
async def test_dashboard_says_when_the_key_is_refused(
    start_relay: RelayFactory, tmp_path: Path, scopes: tuple[str, ...], message: str
) -> None:
    """With an unknown key, or one without agent:read, the page says why and asks for
    another; a good key typed into its form opens the dashboard."""
    relay = await start_relay()
    key = "rk_not_a_key"
    if scopes:
        key = (await auth.create_key(relay.client.app[STORE], "writer", scopes)).secret
    url = f"{relay.client.make_url('/')}?access_token={key}"
    async with open_page(tmp_path / "chromium-profile", url) as page:
        await page.wait_for("document.getElementById('connection').dataset.state === 'error'")
        notice = await page.evaluate("document.getElementById('notice').textContent")
        assert message in notice
        assert await page.evaluate("document.getElementById('key-panel').hidden") is False
        assert await page.evaluate("document.getElementById('sessions-panel').hidden") is True
        assert await page.evaluate("sessionStorage.getItem('relay.apiKey')") is None
        await page.screenshot(tmp_path / "key-refused.png")

        # A good key typed into the form opens the dashboard.
        await page.evaluate(
            f"""document.getElementById('key-input').value = {json.dumps(relay.key)};
            document.getElementById('key-form').requestSubmit(); true"""
        )
        await page.wait_for("document.getElementById('connection').dataset.state === 'live'")
        assert await page.evaluate("document.getElementById('notice').hidden") is True
        assert await page.evaluate("sessionStorage.getItem('relay.apiKey')") == relay.key


class DroppingHub(InProcessHub):
    """The in-process hub, able to cut off every open stream as a slow consumer's is."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Subscription] = []

    @contextmanager
    def subscribe(
        self, accepts: Callable[[StoredChange], bool], limit: int, on_overflow: Callable[[], None]
    ) -> Iterator[Subscription]:
        with super().subscribe(accepts, limit, on_overflow) as subscription:
            self.open.append(subscription)
            try:
                yield subscription
            finally:
                self.open.remove(subscription)

    def drop_streams(self) -> None:
        for subscription in list(self.open):
            subscription.overflow()


@needs_chromium
async def test_dashboard_reconnects_and_catches_up(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> None:
    """When its stream is cut off the page says it is reconnecting, then resumes and
    shows what changed meanwhile."""
    keys: list[NewKey] = []
    hub = DroppingHub()
    settings = make_settings(tmp_path, sse={"retry_ms": 1500})
    client = await aiohttp_client(create_app(settings, hub=hub, on_bootstrap_key=keys.append))
    relay = Relay(client, keys[0].secret)
    events = fixture_events()
    url = f"{relay.client.make_url('/')}?access_token={relay.key}"
    async with open_page(tmp_path / "chromium-profile", url) as page:
        state = "document.getElementById('connection').dataset.state"
        await page.wait_for(f"{state} === 'live'")
        for event in events[:4]:
            await ingest(relay, event)
        await _shows(page, SESSION, "ready", "idle")

        hub.drop_streams()
        await page.wait_for(f"{state} === 'reconnecting'")
        assert await page.evaluate("document.getElementById('connection-text').textContent") == (
            "Reconnecting"
        )
        await ingest(relay, events[4])  # while the page is away
        await page.wait_for(f"{state} === 'live'")
        await _shows(page, SESSION, "ready", "running")
        assert len(hub.open) == 1  # one stream again, not a pile of retries
