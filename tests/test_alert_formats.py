"""Alert formats: PagerDuty incidents that trigger and resolve, Slack messages, static headers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from relay.appkeys import STORE
from relay.webhooks.formats import (
    Action,
    AlertAction,
    decide_actions,
    incident_effect,
    render_slack,
    replay_actions,
)
from tests.conftest import RelayFactory
from tests.receivers import FAST_DELIVERY, Receipt, Receiver, api, eventually, receiver, until
from tests.test_alerts import now_event
from tests.test_cli import relay as cli
from tests.test_read_api import ingest

ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"
ALERTS = {"turn_stall_seconds": 600, "ready_timeout_seconds": 120, "check_interval_seconds": 3600}
SEVERITIES = {"critical", "error", "warning", "info"}
DELIVERY = {**FAST_DELIVERY, "dashboard_url": "https://relay.example.com/"}


def pagerduty_problems(body: Any) -> list[str]:
    """What an Events API v2 body gets wrong (empty: nothing)."""
    problems = []
    if not isinstance(body, dict):
        return ["not an object"]
    if not isinstance(body.get("routing_key"), str) or not body["routing_key"]:
        problems.append("routing_key missing")
    action = body.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        problems.append(f"event_action {action!r}")
    key = body.get("dedup_key")
    if action in ("acknowledge", "resolve") and not (isinstance(key, str) and key):
        problems.append("dedup_key missing on " + str(action))
    if isinstance(key, str) and len(key) > 255:
        problems.append("dedup_key longer than 255")
    payload = body.get("payload")
    if action == "trigger" or payload is not None:
        if not isinstance(payload, dict):
            return [*problems, "payload missing"]
        for field in ("summary", "source"):
            if not isinstance(payload.get(field), str) or not payload[field]:
                problems.append(f"payload.{field} missing")
        if len(payload.get("summary") or "") > 1024:
            problems.append("payload.summary longer than 1024")
        if payload.get("severity") not in SEVERITIES:
            problems.append(f"payload.severity {payload.get('severity')!r}")
    return problems


def slack_problems(body: Any) -> list[str]:
    """What a Slack incoming-webhook body with blocks gets wrong (empty: nothing)."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"]:
        return ["text missing"]
    blocks = body.get("blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
        return ["blocks missing"]
    problems = []
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            text = block.get("text", {})
            if text.get("type") != "plain_text" or not 0 < len(text.get("text", "")) <= 150:
                problems.append("header text")
        elif kind == "section":
            if block.get("text", {}).get("type") not in ("mrkdwn", "plain_text"):
                problems.append("section text")
            fields = block.get("fields", [])
            if len(fields) > 10 or any(len(f.get("text", "")) > 2000 for f in fields):
                problems.append("section fields")
        elif kind == "actions":
            for element in block.get("elements", []):
                if element.get("type") != "button" or not element.get("url", "").startswith(
                    "https://"
                ):
                    problems.append("button")
        elif kind == "context":
            if not block.get("elements"):
                problems.append("context elements")
        else:
            problems.append(f"block type {kind!r}")
    return problems


def checked(validate: Any, status: int = 202) -> Any:
    """An answer that refuses (400) a body with problems, else answers `status`."""

    def answer(receipt: Receipt, seen: int) -> web.Response:
        problems = validate(receipt.payload)
        if problems:
            return web.json_response({"status": "invalid", "errors": problems}, status=400)
        return web.json_response({"status": "success"}, status=status)

    return answer


def actions(got: Receiver, path: str) -> list[tuple[str, str]]:
    return [(r.payload["event_action"], r.payload["dedup_key"]) for r in got.at(path)]


async def subscription_with(relay: Any, got: Receiver, path: str, **fields: Any) -> Any:
    return await api(
        relay, "POST", "/v1/subscriptions", 201, json={"url": got.url + path, **fields}
    )


async def test_pagerduty_incidents_trigger_and_resolve_with_the_same_dedup_key(
    start_relay: RelayFactory,
) -> None:
    """A ready timeout, a stalled turn and a failed turn each trigger, then resolve by key."""
    relay = await start_relay(delivery=DELIVERY, alerts=ALERTS)
    store = relay.client.app[STORE]
    async with receiver() as got:
        got.endpoint("/pd", checked(pagerduty_problems))
        sub = await subscription_with(
            relay, got, "/pd", format="pagerduty", routing_key=ROUTING_KEY
        )
        assert sub["format"] == "pagerduty"
        assert sub["routing_key_set"] is True
        assert sub["ordering"] == "session"  # a resolve never overtakes its trigger
        assert ROUTING_KEY not in str(sub)
        await ingest(relay, now_event("1", "agent.chat.session.created", "chat_pd"))
        await ingest(relay, now_event("2", "agent.chat.turn.started", "chat_pd", "turn_1"))
        start = time.time()
        assert await store.fire_due_alerts(start + 130) == 1  # ready timeout
        await eventually(lambda: len(got.at("/pd")) == 1)
        assert await store.fire_due_alerts(start + 610) == 1  # the turn stalls
        await eventually(lambda: len(got.at("/pd")) == 2)
        await ingest(relay, now_event("3", "agent.worker.ready", "chat_pd"))
        await eventually(lambda: len(got.at("/pd")) == 3)
        await ingest(relay, now_event("4", "agent.chat.turn.completed", "chat_pd", "turn_1"))
        await eventually(lambda: len(got.at("/pd")) == 4)
        failed = now_event("5", "agent.chat.turn.failed", "chat_pd", "turn_2")
        failed["data"]["error"] = {"code": "TOOL_TIMEOUT", "message": "vault search timed out"}
        await ingest(relay, failed)
        await eventually(lambda: len(got.at("/pd")) == 5)
        await ingest(relay, now_event("6", "agent.chat.turn.started", "chat_pd", "turn_3"))
        await ingest(relay, now_event("7", "agent.chat.turn.completed", "chat_pd", "turn_3"))
        await eventually(lambda: len(got.at("/pd")) == 6)
        await ingest(relay, now_event("8", "agent.chat.turn.completed", "chat_pd", "turn_4"))
        ready = "relay/chat_pd/ready_timeout"
        stalled = "relay/chat_pd/turn/turn_1/stalled"
        failures = "relay/chat_pd/turn_failed"
        assert actions(got, "/pd") == [
            ("trigger", ready),
            ("trigger", stalled),
            ("resolve", ready),
            ("resolve", stalled),
            ("trigger", failures),
            ("resolve", failures),
        ]
        receipts = got.at("/pd", delivered=False)
        assert all(r.status == 202 for r in receipts)  # every body passed the rules
        assert all(r.payload["routing_key"] == ROUTING_KEY for r in receipts)
        assert all("webhook-signature" not in r.headers for r in receipts)
        assert receipts[0].payload["payload"]["severity"] == "error"
        assert receipts[1].payload["payload"]["severity"] == "warning"
        trigger = receipts[4].payload["payload"]
        assert "vault search timed out" in trigger["summary"]
        assert trigger["custom_details"]["turn_id"] == "turn_2"
        assert receipts[4].payload["links"][0]["href"].endswith("#session=chat_pd")
        # Changes that neither trigger nor resolve (created, started, a completion with
        # nothing open) are not queued at all.
        listing = await api(relay, "GET", f"/v1/subscriptions/{sub['id']}/deliveries")
        assert (await api(relay, "GET", f"/v1/subscriptions/{sub['id']}"))["queue_depth"] == 0
        assert len(listing["items"]) == 6
        assert {d["status"] for d in listing["items"]} == {"delivered"}


async def test_a_failing_turn_that_had_stalled_resolves_the_stall_and_triggers(
    start_relay: RelayFactory,
) -> None:
    """A stalled turn that fails sends a resolve of its stall, then a failed-turn trigger."""
    relay = await start_relay(delivery=DELIVERY, alerts=ALERTS)
    store = relay.client.app[STORE]
    async with receiver() as got:
        got.endpoint("/pd", checked(pagerduty_problems))
        await subscription_with(
            relay, got, "/pd", format="pagerduty", routing_key=ROUTING_KEY, types=["turn.*"]
        )
        await ingest(relay, now_event("1", "agent.chat.turn.started", "chat_sf", "turn_1"))
        assert await store.fire_due_alerts(time.time() + 610) >= 1
        await eventually(lambda: len(got.at("/pd")) == 1)
        await ingest(relay, now_event("2", "agent.chat.turn.failed", "chat_sf", "turn_1"))
        await eventually(lambda: len(got.at("/pd")) == 3)
        assert actions(got, "/pd") == [
            ("trigger", "relay/chat_sf/turn/turn_1/stalled"),
            ("resolve", "relay/chat_sf/turn/turn_1/stalled"),
            ("trigger", "relay/chat_sf/turn_failed"),
        ]


async def test_slack_bodies_have_text_and_well_formed_blocks(start_relay: RelayFactory) -> None:
    """Each change reaches Slack as `text` and blocks with session, turn, status, error, link."""
    relay = await start_relay(delivery=DELIVERY)
    async with receiver() as got:
        got.endpoint("/slack", checked(slack_problems, 200))
        sub = await subscription_with(relay, got, "/slack", format="slack", types=["turn.*"])
        await ingest(relay, now_event("1", "agent.chat.turn.started", "chat_sl", "turn_1"))
        failed = now_event("2", "agent.chat.turn.failed", "chat_sl", "turn_1")
        failed["data"]["error"] = {"code": "TOOL_TIMEOUT", "message": "search <timed> out"}
        await ingest(relay, failed)
        await eventually(lambda: len(got.at("/slack", delivered=False)) == 2)
        receipts = got.at("/slack", delivered=False)
        assert [r.status for r in receipts] == [200, 200]
        assert all("webhook-signature" not in r.headers for r in receipts)
        body = receipts[1].payload
        assert "turn.failed" in body["text"]
        assert "search &lt;timed&gt; out" in body["text"]
        shown = str(body["blocks"])
        for part in ("chat_sl", "turn_1", "failed", "search &lt;timed&gt; out (TOOL_TIMEOUT)"):
            assert part in shown
        buttons = [b for b in body["blocks"] if b["type"] == "actions"]
        assert buttons[0]["elements"][0]["url"] == "https://relay.example.com/#session=chat_sl"
        listing = await api(relay, "GET", f"/v1/subscriptions/{sub['id']}/deliveries")
        assert {d["status"] for d in listing["items"]} == {"delivered"}


def test_slack_message_of_a_long_error_stays_within_block_limits() -> None:
    """A very long error is cut to Slack's limits; the message stays well formed."""
    change = {
        "type": "turn.failed",
        "session_id": "s" * 500,
        "turn_id": "t",
        "turn": {"status": "failed", "error": {"message": "x" * 10_000, "code": "E"}},
    }
    assert slack_problems(orjson.loads(render_slack(change, None))) == []
    assert AlertAction(Action.RESOLVE, "k").action.value == "resolve"


async def test_custom_headers_arrive_and_env_values_are_read_when_sending(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Static headers reach the receiver in every format; `env:VAR` is read at send time."""
    monkeypatch.setenv("RELAY_TEST_PD_TOKEN", "token-from-env")
    relay = await start_relay(delivery=DELIVERY)
    headers = {"X-Team": "agents", "Authorization": "env:RELAY_TEST_PD_TOKEN"}
    async with receiver() as got:
        paths = {"/std": {}, "/slack": {"format": "slack"}}
        made = {}
        for path, fields in paths.items():
            made[path] = await subscription_with(
                relay, got, path, headers=headers, types=["session.created"], **fields
            )
        assert made["/std"]["headers"] == {
            "X-Team": "********",
            "Authorization": "env:RELAY_TEST_PD_TOKEN",
        }
        await ingest(relay, now_event("1", "agent.chat.session.created", "chat_h"))
        await eventually(lambda: all(got.at(path) for path in paths))
        for path in paths:
            receipt = got.at(path)[0]
            assert receipt.headers["x-team"] == "agents"
            assert receipt.headers["authorization"] == "token-from-env"
        assert "webhook-signature" in got.at("/std")[0].headers


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"format": "pagerduty"}, "routing_key is required"),
        ({"format": "slack", "routing_key": ROUTING_KEY}, "only for format pagerduty"),
        ({"routing_key": ROUTING_KEY}, "only for format pagerduty"),
        ({"format": "teams"}, "format"),
        ({"headers": {"Content-Length": "3"}}, "Content-Length"),
        ({"headers": {"webhook-signature": "v1,x"}}, "webhook-signature"),
        ({"headers": {"Connection": "close"}}, "Connection"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "Transfer-Encoding"),
        ({"headers": {"X-A": "a\r\nX-B: b"}}, "one line"),
        ({"headers": {"bad name": "a"}}, "valid header name"),
    ],
)
async def test_bad_format_routing_key_and_header_combinations_are_refused(
    start_relay: RelayFactory, fields: dict[str, Any], needle: str
) -> None:
    """A PagerDuty subscription without a key, a key elsewhere and refused headers are 400."""
    relay = await start_relay(delivery=DELIVERY)
    body = {"url": "https://example.com/hook", **fields}
    answer = await api(relay, "POST", "/v1/subscriptions", 400, json=body)
    assert answer["error"]["code"] == "INVALID_REQUEST"
    assert needle in answer["error"]["message"]
    assert (await api(relay, "GET", "/v1/subscriptions"))["items"] == []


async def test_patch_keeps_format_and_routing_key_consistent(start_relay: RelayFactory) -> None:
    """PATCH to pagerduty needs a key; away from it drops the key; headers can be replaced."""
    relay = await start_relay(delivery=DELIVERY)
    sub = await api(
        relay, "POST", "/v1/subscriptions", 201, json={"url": "https://example.com/hook"}
    )
    path = f"/v1/subscriptions/{sub['id']}"
    refused = await api(relay, "PATCH", path, 400, json={"format": "pagerduty"})
    assert "routing_key is required" in refused["error"]["message"]
    pd = await api(relay, "PATCH", path, json={"format": "pagerduty", "routing_key": ROUTING_KEY})
    assert (pd["format"], pd["routing_key_set"], pd["ordering"]) == ("pagerduty", True, "session")
    same = await api(relay, "PATCH", path, json={"description": "pager"})
    assert same["routing_key_set"] is True
    slack = await api(relay, "PATCH", path, json={"format": "slack", "headers": {"X-A": "env:A"}})
    assert (slack["format"], slack["routing_key_set"], slack["headers"]) == (
        "slack",
        False,
        {"X-A": "env:A"},
    )


@pytest.mark.parametrize("fmt", ["pagerduty", "slack"])
@pytest.mark.parametrize(("status", "retried"), [(400, False), (429, True), (503, True)])
async def test_receiver_answers_decide_retries_in_every_alert_format(
    start_relay: RelayFactory, fmt: str, status: int, retried: bool
) -> None:
    """A 400 fails at once without retry; a 429 or 5xx is retried until it succeeds."""
    relay = await start_relay(delivery=DELIVERY, alerts=ALERTS)

    def answer(receipt: Receipt, seen: int) -> web.Response:
        first = len([r for r in got.receipts if r.path == "/a"]) == 1
        return web.Response(status=status if first else 202, text="answer")

    async with receiver() as got:
        got.endpoint("/a", answer)
        extra = {"routing_key": ROUTING_KEY} if fmt == "pagerduty" else {}
        sub = await subscription_with(relay, got, "/a", format=fmt, types=["turn.failed"], **extra)
        await ingest(relay, now_event("1", "agent.chat.turn.failed", "chat_r", "turn_1"))
        path = f"/v1/subscriptions/{sub['id']}/deliveries"

        async def finished() -> bool:
            items = (await api(relay, "GET", path))["items"]
            return bool(items) and items[0]["status"] in ("delivered", "failed")

        await until(finished)
        delivery = (await api(relay, "GET", path))["items"][0]
        if retried:
            assert delivery["status"] == "delivered"
            assert [a["status_code"] for a in delivery["attempts"]] == [status, 202]
        else:
            assert delivery["status"] == "failed"
            assert [a["status_code"] for a in delivery["attempts"]] == [400]
            assert len(got.at("/a", delivered=False)) == 1


def test_cli_adds_a_pagerduty_subscription_with_a_header(tmp_path: Path) -> None:
    """`relay subscriptions add --format pagerduty --routing-key K --header 'X-A: b'`."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/cli.db"\n')
    cli(config, "migrate")  # admin commands need a store that exists
    url = "https://example.com/pd"
    added = cli(
        config, "subscriptions", "add", url, "--format", "pagerduty",
        "--routing-key", ROUTING_KEY, "--header", "X-A: b",
    )  # fmt: skip
    assert "created sub_" in added.stdout
    assert "format=pagerduty" in cli(config, "subscriptions", "list").stdout
    refused = cli(config, "subscriptions", "add", url, "--format", "pagerduty", check=False)
    assert refused.returncode == 2
    assert "routing_key is required" in refused.stderr
    bad = cli(config, "subscriptions", "add", url, "--header", "no colon", check=False)
    assert bad.returncode == 2
    assert "NAME: VALUE" in bad.stderr


def test_incident_bookkeeping_resolves_only_what_was_triggered() -> None:
    """Resolves go out only for open keys; a failure that ends a stall does both."""
    opened: dict[str, int] = {}

    def step(change_id: int, kind: str, turn: str | None) -> list[tuple[str, str]]:
        effect = incident_effect(kind, "s", turn)
        return [(a.action.value, a.dedup_key) for a in decide_actions(effect, opened, change_id)]

    assert step(1, "session.created", None) == []
    assert step(2, "session.ready", None) == []  # nothing open: not sent
    assert step(3, "turn.completed", "t1") == []
    assert step(4, "turn.stalled", "t2") == [("trigger", "relay/s/turn/t2/stalled")]
    assert step(5, "turn.failed", "t2") == [
        ("resolve", "relay/s/turn/t2/stalled"),
        ("trigger", "relay/s/turn_failed"),
    ]
    assert step(6, "turn.failed", "t3") == [("trigger", "relay/s/turn_failed")]
    assert opened == {"relay/s/turn_failed": 6}
    assert step(7, "turn.completed", "t4") == [("resolve", "relay/s/turn_failed")]
    assert opened == {}
    # `recover` replays a past change so the receiver ends up as things are now.
    assert replay_actions(incident_effect("turn.failed", "s", "t3"), opened) == (
        AlertAction(Action.RESOLVE, "relay/s/turn/t3/stalled"),
    )


def test_a_long_session_id_gives_a_dedup_key_pagerduty_accepts() -> None:
    """Dedup keys stay within 255 characters and stay distinct per problem."""
    long_id = "s" * 400
    keys = {
        incident_effect("turn.stalled", long_id, "t").triggers,
        incident_effect("session.ready_timeout", long_id, None).triggers,
        incident_effect("turn.failed", long_id, "t").triggers,
    }
    assert len(keys) == 3
    assert all(key is not None and len(key) <= 255 for key in keys)


async def test_a_test_event_to_pagerduty_triggers_and_resolves(start_relay: RelayFactory) -> None:
    """`POST /test` on a PagerDuty subscription sends a valid trigger and its resolve."""
    relay = await start_relay(delivery=DELIVERY)
    async with receiver() as got:
        got.endpoint("/pd", checked(pagerduty_problems))
        sub = await subscription_with(
            relay, got, "/pd", format="pagerduty", routing_key=ROUTING_KEY
        )
        await api(relay, "POST", f"/v1/subscriptions/{sub['id']}/test", 202)
        await eventually(lambda: len(got.at("/pd")) == 2)
        (trigger, first), (resolve, second) = actions(got, "/pd")
        assert (trigger, resolve) == ("trigger", "resolve")
        assert first == second


@pytest.mark.parametrize("fmt", ["pagerduty", "slack"])
async def test_the_ssrf_guard_refuses_loopback_in_every_alert_format(
    start_relay: RelayFactory, fmt: str
) -> None:
    """Without allow_private_networks an alert to loopback is refused, never sent."""
    relay = await start_relay(delivery={**DELIVERY, "allow_private_networks": False})
    async with receiver() as got:
        got.endpoint("/a")
        extra = {"routing_key": ROUTING_KEY} if fmt == "pagerduty" else {}
        sub = await subscription_with(relay, got, "/a", format=fmt, types=["turn.failed"], **extra)
        await ingest(relay, now_event("1", "agent.chat.turn.failed", "chat_x", "turn_1"))
        path = f"/v1/subscriptions/{sub['id']}/deliveries"

        async def failed() -> bool:
            items = (await api(relay, "GET", path))["items"]
            return bool(items) and items[0]["status"] == "failed"

        await until(failed)
        delivery = (await api(relay, "GET", path))["items"][0]
        assert delivery["last_error"].startswith("refused")
        assert got.receipts == []


async def test_a_resolve_waits_for_its_trigger_to_be_delivered(
    start_relay: RelayFactory,
) -> None:
    """When the trigger is retried, the resolve queued meanwhile goes only after it."""
    relay = await start_relay(
        delivery={**DELIVERY, "retry_schedule_seconds": [0.5, 0.5]}, alerts=ALERTS
    )
    store = relay.client.app[STORE]

    def answer(receipt: Receipt, seen: int) -> web.Response:
        first = len([r for r in got.receipts if r.path == "/pd"]) == 1
        return web.json_response({"status": "x"}, status=503 if first else 202)

    async with receiver() as got:
        got.endpoint("/pd", answer)
        await subscription_with(relay, got, "/pd", format="pagerduty", routing_key=ROUTING_KEY)
        await ingest(relay, now_event("1", "agent.chat.session.created", "chat_order"))
        assert await store.fire_due_alerts(time.time() + 130) == 1
        await eventually(lambda: len(got.receipts) == 1)  # the trigger, answered 503
        await ingest(relay, now_event("2", "agent.worker.ready", "chat_order"))
        await eventually(lambda: len(got.at("/pd")) == 2)
        sent = [(r.payload["event_action"], r.status) for r in got.receipts]
        assert sent == [("trigger", 503), ("trigger", 202), ("resolve", 202)]
