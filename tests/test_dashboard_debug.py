"""The dashboard as a tool to debug with: session pages, alerts, failures, subscriptions.

Every test drives Debian's headless Chromium against a live relay and saves screenshots
as test artefacts (in `$RELAY_TEST_ARTIFACTS`, else `build/test-artifacts`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from relay import auth
from relay.appkeys import STORE
from tests.browser import Page, needs_chromium, open_page
from tests.conftest import SECRET, Relay, RelayFactory
from tests.receivers import FAST_DELIVERY, Receipt, api, receiver, until
from tests.test_alerts import now_event
from tests.test_read_api import ingest

pytestmark = needs_chromium
ALERTS = {"turn_stall_seconds": 600, "ready_timeout_seconds": 120, "check_interval_seconds": 3600}
WIDTH = 1280
LIVE = "document.getElementById('connection').dataset.state === 'live'"
LONG_ID = "chat_" + "very_long_session_identifier_" * 8


def artefacts() -> Path:
    folder = Path(os.environ.get("RELAY_TEST_ARTIFACTS", "build/test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def shoot(page: Page, name: str) -> bytes:
    await page.wait_for("document.getAnimations().every((a) => a.playState !== 'running')")
    png = await page.screenshot(artefacts() / name)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return png


async def click(page: Page, selector: str) -> None:
    """Click the first element matching `selector` (waiting for it to be there)."""
    found = json.dumps(selector)
    await page.wait_for(f"document.querySelector({found}) !== null")
    await page.evaluate(f"document.querySelector({found}).click(); true")


def text_of(selector: str) -> str:
    found = json.dumps(selector)
    return f"(document.querySelector({found}) || {{}}).textContent || ''"


async def no_column_cut_off(page: Page) -> None:
    """No table cell or card reaches past the window; the page does not scroll sideways."""
    overflow = await page.evaluate(
        """(() => {
          const width = document.documentElement.clientWidth;
          const bad = [];
          for (const node of document.querySelectorAll('main th, main td, main .card')) {
            if (node.offsetParent === null) continue;
            const box = node.getBoundingClientRect();
            if (box.right > width + 0.5) bad.push(node.textContent.slice(0, 40));
          }
          if (document.documentElement.scrollWidth > width) bad.push('page scrolls sideways');
          return bad;
        })()"""
    )
    assert overflow == []


async def open_dashboard(relay: Relay, tmp_path: Path, fragment: str = "") -> Any:
    url = f"{relay.client.make_url('/')}?access_token={relay.key}{fragment}"
    return open_page(tmp_path / "chromium-profile", url, width=WIDTH, height=900)


async def send_demo(relay: Relay, tmp_path: Path) -> None:
    """`relay send --demo` against the running relay, as a new user would try it."""
    config = tmp_path / "send.toml"
    config.write_text(
        f'[[sources]]\nid = "casedev"\nprovider = "casedev"\nsecrets = ["{SECRET}"]\n'
    )
    url = str(relay.client.make_url("/")).rstrip("/")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "send", "--demo", "--sessions", "6",
        "--url", url, "--config", str(config), "--delay", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out, err)


async def test_demo_answers_why_not_ready_and_which_turns_failed_in_two_clicks(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """After `relay send --demo`: one click on a session says why it is not ready; one
    click on Failures lists the failed turns with their errors."""
    relay = await start_relay(alerts=ALERTS)
    await send_demo(relay, tmp_path)
    # One more session that never gets a worker: the question the page must answer.
    await ingest(relay, now_event("s1", "agent.chat.session.created", "chat_stuck_demo"))
    await ingest(relay, now_event("s2", "agent.runtime.reused", "chat_stuck_demo"))
    failed = list((await api(relay, "GET", "/v1/changes?type=turn.failed&limit=1000"))["items"])
    assert failed  # the demo always has failed turns
    async with await open_dashboard(relay, tmp_path) as page:
        await page.wait_for(LIVE)
        await page.wait_for("document.querySelectorAll('#rows tr').length >= 7")
        await no_column_cut_off(page)
        await shoot(page, "dashboard-sessions.png")

        await click(page, 'a[data-session-link="chat_stuck_demo"]')  # click 1
        verdict = await page.wait_for(
            f"{text_of('#session-verdict')}.includes('waiting for the worker') && "
            f"{text_of('#session-verdict')}"
        )
        assert verdict.startswith("Not ready")
        steps = await page.evaluate(
            "[...document.querySelectorAll('#session-timeline li')]"
            ".map((li) => [li.dataset.step, li.className])"
        )
        assert steps == [
            ["created", "done"],
            ["runtime", "done"],
            ["scope", "pending"],
            ["worker", "pending"],
            ["ready", "pending"],
        ]
        await no_column_cut_off(page)
        await shoot(page, "dashboard-session.png")

        await click(page, '#nav a[data-view="failures"]')  # click 1 (from anywhere)
        await page.wait_for(
            f"document.querySelectorAll('#failures-table tbody tr').length === {len(failed)}"
        )
        shown = await page.evaluate(
            "[...document.querySelectorAll('#failures-table tbody tr')]"
            ".map((tr) => [tr.dataset.sessionId, tr.dataset.turnId, tr.cells[4].textContent])"
        )
        expected = {
            (c["session_id"], c["turn_id"], f"{c['turn']['error']['message']} "
             f"({c['turn']['error']['code']})")
            for c in failed
        }  # fmt: skip
        assert {tuple(row) for row in shown} == expected
        charts = await page.evaluate(
            "[...document.querySelectorAll('.chart')].map((f) => Number(f.dataset.count))"
        )
        assert len(charts) == 3
        assert all(count > 0 for count in charts)
        await no_column_cut_off(page)
        await shoot(page, "dashboard-failures.png")


async def test_session_page_updates_its_timeline_and_turns_live(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """An open session page follows the stream: readiness steps, then turns and their end."""
    relay = await start_relay(alerts=ALERTS)
    await ingest(relay, now_event("1", "agent.chat.session.created", "chat_live"))
    async with await open_dashboard(relay, tmp_path, "#session=chat_live") as page:
        await page.wait_for(LIVE)
        step = "document.querySelector('#session-timeline li[data-step=\"{}\"]').className"
        await page.wait_for(f"{step.format('worker')} === 'pending'")
        await ingest(relay, now_event("2", "agent.runtime.reused", "chat_live"))
        await page.wait_for(f"{step.format('runtime')} === 'done'")
        await ingest(relay, now_event("3", "agent.worker.ready", "chat_live"))
        await page.wait_for(f"{step.format('ready')} === 'done'")
        assert (await page.evaluate(text_of("#session-verdict"))).startswith("Ready since")

        turn = "document.querySelector('#session-turns tr[data-turn-id=\"turn_1\"]')"
        await ingest(relay, now_event("4", "agent.chat.turn.started", "chat_live", "turn_1"))
        await page.wait_for(f"{turn} && {turn}.dataset.status === 'running'")
        tool = now_event("4t", "agent.chat.turn.tool.started", "chat_live", "turn_1")
        tool["provider"] = "casedev"  # a stream frame in its stored, canonical form
        tool["data"].update({"tool_call_id": "call_1", "tool_name": "vault_search"})
        await ingest(relay, tool)  # no change of its own: shown with the turn's next change
        failed = now_event("5", "agent.chat.turn.failed", "chat_live", "turn_1")
        failed["data"]["error"] = {"code": "TOOL_TIMEOUT", "message": "vault search timed out"}
        await ingest(relay, failed)
        await page.wait_for(f"{turn}.dataset.status === 'failed'")
        assert await page.evaluate(f"{turn}.cells[5].textContent") == "1"  # one tool call
        assert "vault search timed out (TOOL_TIMEOUT)" in await page.evaluate(
            f"{turn}.cells[6].textContent"
        )
        await page.wait_for(
            "document.querySelectorAll('#session-changes tr[data-change-type]').length >= 5"
        )
        await page.wait_for("document.querySelectorAll('#session-events tbody tr').length === 6")
        await shoot(page, "session-live.png")


async def test_an_alert_appears_open_and_then_resolves(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """A stalled turn shows as an open alert, and as resolved once the turn ends."""
    relay = await start_relay(alerts=ALERTS)
    store = relay.client.app[STORE]
    await ingest(relay, now_event("1", "agent.chat.session.created", "chat_alert"))
    await ingest(relay, now_event("2", "agent.worker.ready", "chat_alert"))
    await ingest(relay, now_event("3", "agent.chat.turn.started", "chat_alert", "turn_1"))
    async with await open_dashboard(relay, tmp_path, "#alerts") as page:
        await page.wait_for(LIVE)
        await page.wait_for(f"{text_of('#alerts-open')}.includes('No open alerts')")
        assert await store.fire_due_alerts(time.time() + 610) == 1
        row = "document.querySelector('tr[data-alert=\"turn.stalled\"]')"
        await page.wait_for(f"{row} && {row}.dataset.state === 'open'")
        assert await page.evaluate(f"{row}.closest('#alerts-open') !== null")
        await shoot(page, "alert-open.png")
        await ingest(relay, now_event("4", "agent.chat.turn.completed", "chat_alert", "turn_1"))
        await page.wait_for(f"{row} && {row}.dataset.state === 'resolved'")
        assert await page.evaluate(f"{row}.closest('#alerts-resolved') !== null")
        assert "turn.completed" in await page.evaluate(f"{row}.cells[4].textContent")
        await shoot(page, "alert-resolved.png")


async def test_subscriptions_pause_enable_and_retry_from_the_page(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """The page shows a failed delivery with its answer; Pause, Enable and Retry work."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    answers = {"status": 400}

    def answer(receipt: Receipt, seen: int) -> web.Response:
        return web.Response(status=answers["status"], text=f"answered {answers['status']}")

    async with receiver() as got:
        got.endpoint("/hook", answer)
        sub = await api(
            relay, "POST", "/v1/subscriptions", 201,
            json={"url": got.url + "/hook", "types": ["session.created"]},
        )  # fmt: skip
        deliveries = f"/v1/subscriptions/{sub['id']}/deliveries"
        await ingest(relay, now_event("1", "agent.chat.session.created", "chat_sub"))

        async def status(wanted: str) -> bool:
            items = (await api(relay, "GET", deliveries))["items"]
            return bool(items) and items[0]["status"] == wanted

        await until(lambda: status("failed"))
        async with await open_dashboard(relay, tmp_path, "#subscriptions") as page:
            await page.wait_for(LIVE)
            card = f"document.querySelector('[data-subscription-id=\"{sub['id']}\"]')"
            delivery = f"{card}.querySelector('tr[data-status]')"
            await page.wait_for(f"{card} && {delivery}.dataset.status === 'failed'")
            assert "400" in await page.evaluate(f"{delivery}.cells[4].textContent")
            assert "answered 400" in await page.evaluate(f"{delivery}.cells[4].textContent")
            facts = await page.evaluate(f"{card}.querySelector('.facts').textContent")
            assert "0 waiting · 1 failed" in facts
            assert "Failing since" in facts
            await no_column_cut_off(page)
            await shoot(page, "subscription-failed.png")

            await page.evaluate(f"{card}.querySelector('[data-action=\"pause\"]').click(); true")
            await page.wait_for(
                f"document.querySelector('[data-subscription-id=\"{sub['id']}\"]')"
                ".dataset.enabled === 'false'"
            )
            assert (await api(relay, "GET", f"/v1/subscriptions/{sub['id']}"))["enabled"] is False
            # While paused, a new change waits in the queue, and the page says so.
            await ingest(relay, now_event("2", "agent.chat.session.created", "chat_sub_2"))

            async def queued() -> bool:
                found = await api(relay, "GET", f"/v1/subscriptions/{sub['id']}")
                return bool(found["queue_depth"] == 1)

            await until(queued)
            await page.evaluate("location.hash = '#'; location.hash = '#subscriptions'; true")
            await page.wait_for(f"{card} && {card}.textContent.includes('1 waiting')")
            await shoot(page, "subscription-paused.png")
            answers["status"] = 200
            await page.evaluate(f"{card}.querySelector('[data-action=\"enable\"]').click(); true")
            await page.wait_for(f"{card}.dataset.enabled === 'true'")
            assert (await api(relay, "GET", f"/v1/subscriptions/{sub['id']}"))["enabled"] is True

            failed = f"{card}.querySelector('tr[data-status=\"failed\"]')"
            await page.wait_for(f"{card} && {failed} !== null")
            await page.evaluate(f"{failed}.querySelector('[data-action=\"retry\"]').click(); true")
            await until(lambda: status("delivered"))
            await page.evaluate(
                "location.hash = '#'; location.hash = '#subscriptions'; true"
            )  # read the page again
            statuses = (
                f"[...{card}.querySelectorAll('tr[data-status]')].map((tr) => tr.dataset.status)"
            )
            await page.wait_for(
                f'{card} && JSON.stringify({statuses}) === \'["delivered","delivered"]\''
            )
            await shoot(page, "subscription-retried.png")


async def test_search_and_the_turn_status_filter_find_sessions(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """Search narrows the list to a session id and opens one by exact id; the turn-status
    filter shows failed and conflict sessions; a long id does not push columns out."""
    relay = await start_relay(alerts=ALERTS)
    for n, session in enumerate(("chat_ok", "chat_bad", "chat_busy", LONG_ID)):
        await ingest(relay, now_event(f"{n}a", "agent.chat.session.created", session))
    await ingest(relay, now_event("b1", "agent.chat.turn.failed", "chat_bad", "turn_1"))
    await ingest(relay, now_event("c1", "agent.chat.turn.started", "chat_busy", "turn_1"))
    await ingest(relay, now_event("c2", "agent.chat.turn.completed", "chat_busy", "turn_1"))
    conflict = now_event("c3", "agent.chat.turn.conflict", "chat_busy", "turn_2")
    conflict["data"]["activeTurnId"] = "turn_1"
    await ingest(relay, conflict)
    shown = "[...document.querySelectorAll('#rows tr')].map((tr) => tr.dataset.sessionId)"
    async with await open_dashboard(relay, tmp_path) as page:
        await page.wait_for(LIVE)
        await page.wait_for(f"{shown}.length === 4")
        await no_column_cut_off(page)

        def choose(value: str) -> str:
            return (
                "(() => { const s = document.getElementById('filter-turn');"
                f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change'));"
                " return true; })()"
            )

        await page.evaluate(choose("failed"))
        await page.wait_for(f"JSON.stringify({shown}) === '[\"chat_bad\"]'")
        await page.evaluate(choose("conflict"))
        await page.wait_for(f"JSON.stringify({shown}) === '[\"chat_busy\"]'")
        await page.evaluate(choose(""))

        search = (
            "(() => {{ const s = document.getElementById('search'); s.value = {};"
            " s.dispatchEvent(new Event('input')); return true; }})()"
        )
        await page.evaluate(search.format(json.dumps("bad")))
        await page.wait_for(f"JSON.stringify({shown}) === '[\"chat_bad\"]'")
        await shoot(page, "search.png")
        await page.evaluate(search.format(json.dumps("chat_ok")))
        await page.evaluate(
            "document.getElementById('search').dispatchEvent("
            "new KeyboardEvent('keydown', {key: 'Enter'})); true"
        )
        await page.wait_for("location.hash === '#session=chat_ok'")
        await page.wait_for(f"{text_of('#session-title')} === 'chat_ok'")

        await page.evaluate(f"location.hash = '#session={LONG_ID}'; true")
        await page.wait_for(f"{text_of('#session-title')} === {json.dumps(LONG_ID)}")
        await no_column_cut_off(page)
        await shoot(page, "long-id.png")


async def test_subscriptions_page_says_a_read_only_key_may_not_manage_them(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """With an agent:read key the subscriptions page says that agent:write is needed."""
    relay = await start_relay()
    reader = (await auth.create_key(relay.client.app[STORE], "reader", (auth.READ,))).secret
    url = f"{relay.client.make_url('/')}?access_token={reader}#subscriptions"
    async with open_page(tmp_path / "chromium-profile", url, width=WIDTH) as page:
        await page.wait_for(LIVE)
        notice = await page.wait_for(
            f"{text_of('#notice')}.includes('403') && {text_of('#notice')}"
        )
        assert "Not allowed with this key (403)" in notice
        assert "agent:write" in notice
        assert await page.evaluate("document.getElementById('key-panel').hidden") is True
