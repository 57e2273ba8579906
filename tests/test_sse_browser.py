"""The browser's own EventSource, in Debian's headless Chromium, against a live relay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.app import create_app
from relay.appkeys import HUB
from relay.auth import NewKey
from tests.browser import launch, needs_chromium
from tests.conftest import LIFECYCLE_CHANGES, Relay, fixture_events, make_settings
from tests.test_read_api import ingest

CHANGE_TYPES = [
    "session.created",
    "session.ready",
    "session.provisioning",
    "turn.started",
    "turn.completed",
    "turn.failed",
    "turn.conflict",
]
PAGE = """<!doctype html><meta charset="utf-8"><title>relay stream</title><script>
const key = new URLSearchParams(location.search).get("key");
const state = {opens: 0, seen: []};
const report = () => fetch("/_test/report", {method: "POST", body: JSON.stringify(state)});
const source = new EventSource("/v1/stream?access_token=" + key);
source.onopen = () => { state.opens += 1; report(); };
for (const type of TYPES) {
  source.addEventListener(type, (e) => {
    state.seen.push([Number(e.lastEventId), e.type]);
    report();
  });
}
</script>""".replace("TYPES", str(CHANGE_TYPES))

pytestmark = needs_chromium


async def test_browser_eventsource_receives_changes_and_resumes(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> None:
    """EventSource gets every change in order, and after the server closes the stream it
    reconnects with Last-Event-ID and gets the rest exactly once."""
    reports: list[dict[str, Any]] = []
    reported = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        reports.append(await request.json())
        reported.set()
        return web.Response(status=204)

    keys: list[NewKey] = []
    app = create_app(make_settings(tmp_path, sse={"retry_ms": 200}), on_bootstrap_key=keys.append)
    app.router.add_get("/_test/page", page)
    app.router.add_post("/_test/report", report)
    client = await aiohttp_client(app)
    relay = Relay(client, keys[0].secret)

    async def until(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 60  # Chromium starts slowly on a loaded machine
        while time.monotonic() < deadline:
            if reports and check(reports[-1]):
                return reports[-1]
            reported.clear()
            try:
                await asyncio.wait_for(reported.wait(), timeout=0.1)
            except TimeoutError:
                continue
        raise AssertionError(f"the browser did not get there; last report: {reports[-1:]}")

    url = str(client.make_url("/_test/page")) + f"?key={relay.key}"
    browser = await launch(tmp_path / "chromium-profile", url)
    try:
        await until(lambda r: r["opens"] >= 1)
        events = fixture_events()
        for event in events[:4]:
            await ingest(relay, event)
        await until(lambda r: len(r["seen"]) >= 2)

        app[HUB].close()  # the server ends every stream; EventSource must come back
        await ingest(relay, events[4])  # while the browser is away (it waits 200 ms)
        await until(lambda r: r["opens"] >= 2)
        for event in events[5:]:
            await ingest(relay, event)
        final = await until(lambda r: len(r["seen"]) >= len(LIFECYCLE_CHANGES))
    finally:
        browser.kill()
        await browser.wait()

    listed = await client.get("/v1/changes", headers={"Authorization": f"Bearer {relay.key}"})
    ids = [change["id"] for change in (await listed.json())["items"]]
    assert [change_id for change_id, _ in final["seen"]] == ids
    assert [kind for _, kind in final["seen"]] == LIFECYCLE_CHANGES
    assert final["opens"] >= 2
