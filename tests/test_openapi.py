"""`GET /openapi.json`: a valid OpenAPI 3.1 document of every route, true to real answers."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from pydantic import BaseModel, ValidationError
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from relay import auth
from relay.api_models import (
    ChangePage,
    EventLogPage,
    IngestAnswer,
    RawChange,
    SessionEventPage,
    SessionPage,
    SessionState,
    TurnPage,
)
from relay.app import create_app
from relay.appkeys import STORE
from relay.auth import NewKey
from relay.webhooks.api_models import (
    DeliveryPage,
    DeliveryView,
    Requeued,
    SubscriptionList,
    SubscriptionView,
    SubscriptionWithSecret,
)
from relay.webhooks.subscriptions import SubscriptionFields
from tests.conftest import LIFECYCLE_CHANGES, Relay, RelayFactory, fixture_events, make_settings
from tests.receivers import FAST_DELIVERY, Receipt, api, eventually, receiver, subscribe, until
from tests.test_alerts import now_event
from tests.test_ingest import signed
from tests.test_read_api import EXPECTED, ingest

SESSION = EXPECTED["session_id"]


async def test_document_is_valid_openapi_31_served_without_a_key(relay: Relay) -> None:
    """The document is served without an API key and validates as OpenAPI 3.1."""
    resp = await relay.client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    document = await resp.json()
    assert document["openapi"] == "3.1.0"
    validate(document)
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["accessToken"] == {**schemes["accessToken"], "in": "query"}


async def test_document_lists_every_route_of_the_app(relay: Relay) -> None:
    """Every method and path the router serves (HEAD aside) is in the document, and no other."""
    document = await (await relay.client.get("/openapi.json")).json()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in relay.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    assert ("post", "/v1/ingest/{source_id}") in documented


async def test_every_error_status_names_its_codes(relay: Relay) -> None:
    """Scoped routes declare 401/403, parameterised ones 400, and each error lists its codes."""
    document = await (await relay.client.get("/openapi.json")).json()
    sessions = document["paths"]["/v1/sessions/{session_id}"]["get"]
    assert {"200", "400", "401", "403", "404"} <= set(sessions["responses"])
    ingest = document["paths"]["/v1/ingest/{source_id}"]["post"]
    assert {"200", "202", "400", "401", "404", "413", "503"} == set(ingest["responses"])
    assert ingest["security"] == []
    unauthorized = ingest["responses"]["401"]["content"]["application/json"]["schema"]
    codes = unauthorized["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]
    assert codes == ["MISSING_SIGNATURE", "INVALID_SIGNATURE", "TIMESTAMP_OUT_OF_TOLERANCE"]
    names = {p["name"] for p in document["paths"]["/v1/stream"]["get"]["parameters"]}
    assert names == {"session_id", "type", "last_event_id", "Last-Event-ID"}


async def test_webhook_routes_need_the_write_scope_and_name_their_answers(relay: Relay) -> None:
    """Subscription and delivery routes take `agent:write`, their body models and codes."""
    document = await (await relay.client.get("/openapi.json")).json()
    webhooks = {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if operation["tags"] == ["webhooks"]
    }
    assert len(webhooks) == 12
    write = [{"bearer": ["agent:write"]}]  # no ?access_token= outside event streams
    for operation in webhooks.values():
        assert operation["security"] == write
        assert {"401", "403"} <= set(operation["responses"])

    def answer(method: str, path: str, status: str) -> Any:
        return webhooks[method, path]["responses"][status]["content"]["application/json"]["schema"]

    def codes(method: str, path: str, status: str) -> Any:
        error = answer(method, path, status)["allOf"][1]["properties"]["error"]
        return error["properties"]["code"]["enum"]

    def schema_of(method: str, path: str, status: str) -> str:
        ref: str = answer(method, path, status)["$ref"]
        return ref.rsplit("/", 1)[-1]

    create = webhooks["post", "/v1/subscriptions"]
    body = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/NewSubscription")
    assert schema_of("post", "/v1/subscriptions", "201") == "SubscriptionWithSecret"
    assert codes("post", "/v1/subscriptions", "400") == ["INVALID_JSON", "INVALID_REQUEST"]
    assert schema_of("get", "/v1/subscriptions/{id}", "200") == "SubscriptionView"
    assert "secret" not in document["components"]["schemas"]["SubscriptionView"]["properties"]
    assert codes("post", "/v1/deliveries/{id}/retry", "409") == ["CONFLICT"]
    assert codes("get", "/v1/subscriptions/{id}/deliveries", "400") == ["INVALID_PARAMETER"]
    assert schema_of("get", "/v1/subscriptions/{id}/deliveries", "200") == "DeliveryPage"
    assert "content" not in webhooks["delete", "/v1/subscriptions/{id}"]["responses"]["204"]


async def test_bad_query_values_are_400_naming_the_parameter(relay: Relay) -> None:
    """A query value the model refuses is 400 INVALID_PARAMETER whose message names it."""
    cases = [
        ("/v1/events", {"limit": "1001"}, "limit"),
        ("/v1/changes", {"after": "x"}, "after"),
        ("/v1/sessions", {"turn_status": "busy"}, "turn_status"),
        ("/v1/sessions/x", {"wait": "true", "timeout": "-1"}, "timeout"),
        ("/v1/stream", {"last_event_id": "-5"}, "last_event_id"),
    ]
    for path, params, name in cases:
        resp = await relay.client.get(path, params=params, headers=relay.auth)
        assert resp.status == 400, (path, params)
        error = (await resp.json())["error"]
        assert error["code"] == "INVALID_PARAMETER"
        assert error["message"].startswith(name + ":"), error


async def test_real_answers_validate_against_the_response_models(relay: Relay) -> None:
    """Ingest answers, snapshots, pages and alert changes of the fixture fit their models."""
    # A second session stays provisioning with a turn running: both alerts come due.
    unready = [
        now_event("a1", "agent.chat.session.created", "chat_alerts"),
        now_event("a2", "agent.chat.turn.started", "chat_alerts", "turn_a"),
    ]
    for event in [*fixture_events(), fixture_events()[0], *unready]:
        body = orjson.dumps(event)
        resp = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        answer = IngestAnswer.model_validate(await resp.json())
        assert answer.duplicate == (resp.status == 200)
    # Alerts (no cause) join the change log once their deadlines pass.
    assert await relay.client.app[STORE].fire_due_alerts(4102444800.0) > 0
    pages: list[tuple[str, type[BaseModel]]] = [
        ("/v1/events", EventLogPage),
        ("/v1/changes", ChangePage),
        ("/v1/sessions", SessionPage),
        (f"/v1/sessions/{SESSION}", SessionState),
        (f"/v1/sessions/{SESSION}/turns", TurnPage),
        (f"/v1/sessions/{SESSION}/events", SessionEventPage),
    ]
    for path, model in pages:
        resp = await relay.client.get(path, headers=relay.auth)
        assert resp.status == 200, path
        model.model_validate_json(await resp.read(), strict=False)
    changes = ChangePage.model_validate(
        await (await relay.client.get("/v1/changes", headers=relay.auth)).json()
    )
    alerts = {change.type for change in changes.items if change.cause is None}
    assert alerts == {"turn.stalled", "session.ready_timeout"}
    everything = await relay.client.get("/v1/changes", params={"type": "*"}, headers=relay.auth)
    page = ChangePage.model_validate_json(await everything.read(), strict=False)
    raw = [change for change in page.items if isinstance(change, RawChange)]
    assert raw
    assert len(page.items) == len(raw) + len(changes.items)
    turns = await relay.client.get(f"/v1/sessions/{SESSION}/turns", headers=relay.auth)
    statuses = {turn.status for turn in TurnPage.model_validate(await turns.json()).items}
    assert statuses == {"completed", "failed", "conflict"}


def gone(receipt: Receipt, seen: int) -> web.Response:
    return web.Response(status=410, text="gone for good")


async def test_real_webhook_answers_validate_against_the_response_models(
    start_relay: RelayFactory,
) -> None:
    """Subscriptions, deliveries with their attempts, pages and recover answers fit their models."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        got.endpoint("/gone", gone)
        hook = SubscriptionWithSecret.model_validate(await subscribe(relay, got, "/hook"))
        dead = SubscriptionWithSecret.model_validate(
            await subscribe(relay, got, "/gone", ordering="session", session_ids=[SESSION])
        )
        for event in fixture_events():
            await ingest(relay, event)
        sent = await api(relay, "POST", f"/v1/subscriptions/{hook.id}/test", status=202)
        test = DeliveryView.model_validate(sent)
        assert (test.change_id, test.session_id, test.type) == (None, None, "webhook.test")
        await eventually(lambda: len(got.at("/hook")) == len(LIFECYCLE_CHANGES) + 1)

        async def disabled() -> bool:
            return not (await api(relay, "GET", f"/v1/subscriptions/{dead.id}"))["enabled"]

        await until(disabled)
    off = SubscriptionView.model_validate(await api(relay, "GET", f"/v1/subscriptions/{dead.id}"))
    assert off.disabled_reason is not None
    assert off.failing_since is not None
    rotated = SubscriptionWithSecret.model_validate(
        await api(relay, "POST", f"/v1/subscriptions/{hook.id}/rotate-secret")
    )
    assert rotated.previous_secret_expires_at is not None
    assert rotated.secret != hook.secret
    listing = SubscriptionList.model_validate(await api(relay, "GET", "/v1/subscriptions"))
    assert {s.id for s in listing.items} == {hook.id, dead.id}  # and no secrets (extra=forbid)
    page = DeliveryPage.model_validate(
        await api(relay, "GET", f"/v1/subscriptions/{hook.id}/deliveries", params={"limit": 3})
    )
    assert page.next_after == page.items[-1].id
    assert {d.status for d in page.items} == {"delivered"}
    assert all(d.attempts[0].status_code == 200 for d in page.items)
    failed = DeliveryPage.model_validate(
        await api(relay, "GET", f"/v1/subscriptions/{dead.id}/deliveries")
    )
    assert failed.items[0].attempts[0].status_code == 410
    assert failed.items[0].status == "failed"
    first = failed.items[0].id
    DeliveryView.model_validate(await api(relay, "GET", f"/v1/deliveries/{first}"))
    since = {"since": "2000-01-01T00:00:00Z"}
    recovered = await api(
        relay, "POST", f"/v1/subscriptions/{dead.id}/recover", status=202, json=since
    )
    assert Requeued.model_validate(recovered).queued >= 1
    retried = await api(relay, "POST", f"/v1/deliveries/{first}/retry", status=202)
    assert DeliveryView.model_validate(retried).next_attempt_at is not None
    enabled = await api(relay, "POST", f"/v1/subscriptions/{dead.id}/enable")
    assert SubscriptionView.model_validate(enabled).enabled
    patched = await api(relay, "PATCH", f"/v1/subscriptions/{hook.id}", json={"enabled": False})
    assert SubscriptionView.model_validate(patched).disabled_reason == "disabled through the API"


# -- schemathesis against a live relay -------------------------------------------------------


class LiveRelay:
    """A relay served on loopback from a thread of its own, for synchronous HTTP clients."""

    def __init__(self, tmp_path: Path) -> None:
        self._keys: list[NewKey] = []
        # Nothing leaves the machine: `conforms` points every subscription at a loopback
        # address, which the SSRF guard refuses without connecting; a small timeout bounds
        # any attempt regardless.
        delivery = {"timeout_seconds": 1, "shutdown_grace_seconds": 0.2}
        settings = make_settings(tmp_path, delivery=delivery)
        self._app = create_app(settings, on_bootstrap_key=self._keys.append)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""

    @property
    def key(self) -> str:
        return self._keys[0].secret

    def create_key(self, *scopes: str) -> str:
        """A new API key with `scopes`, made on the relay's own loop."""
        assert self._loop is not None
        made = auth.create_key(self._app[STORE], "test", scopes)
        return asyncio.run_coroutine_threadsafe(made, self._loop).result(10).secret

    def __enter__(self) -> LiveRelay:
        self._thread.start()
        assert self._ready.wait(30), "the relay did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self._app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


@pytest.fixture(scope="module")
def live_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRelay]:
    with LiveRelay(tmp_path_factory.mktemp("live")) as live:
        for event in fixture_events():
            body = orjson.dumps(event)
            resp = requests.post(
                f"{live.url}/v1/ingest/casedev", data=body, headers=signed(body), timeout=10
            )
            assert resp.status_code == 202
        yield live


class Targets:
    """Ids that exist in the live relay, for path parameters: two subscriptions (one for
    DELETE to remove) and a delivery."""

    def __init__(self, live: LiveRelay) -> None:
        headers = {"Authorization": f"Bearer {live.key}"}

        def call(path: str, status: int, body: object = None) -> dict[str, Any]:
            resp = requests.post(f"{live.url}{path}", json=body, headers=headers, timeout=10)
            assert resp.status_code == status, resp.text
            answer: dict[str, Any] = resp.json()
            return answer

        self.kept = call("/v1/subscriptions", 201, {"url": LOOPBACK_HOOK})["id"]
        self.doomed = call("/v1/subscriptions", 201, {"url": LOOPBACK_HOOK})["id"]
        self.delivery = str(call(f"/v1/subscriptions/{self.kept}/test", 202)["id"])

    def path_parameters(self, operation: APIOperation) -> dict[str, str]:
        found = {"session_id": SESSION, "source_id": "open", "name": "app.js", "path": "x"}
        if operation.path.startswith("/v1/deliveries/"):
            found["id"] = self.delivery
        elif operation.method.upper() == "DELETE":
            found["id"] = self.doomed
        else:
            found["id"] = self.kept
        return {name: found[name] for name in re.findall(r"\{(\w+)\}", operation.path)}


LOOPBACK_HOOK = "http://127.0.0.1:9/hook"


def keep_on_loopback(body: object) -> None:
    """Point a subscription body's valid URL at a loopback address the relay refuses."""
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return
    try:
        SubscriptionFields(url=body["url"])
    except ValidationError:
        return  # refused with 400: it never reaches the dispatcher
    body["url"] = LOOPBACK_HOOK


@pytest.fixture(scope="module")
def api_schema(live_relay: LiveRelay) -> BaseSchema:
    schema = schemathesis.openapi.from_url(f"{live_relay.url}/openapi.json")
    schema.config.generation.update(with_security_parameters=False)
    # A stream never ends: the SSE routes are covered by their own tests.
    return schema.exclude(path_regex=r"/stream$")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# A deeper, randomised run: RELAY_FUZZ_EXAMPLES=500 pytest tests/test_openapi.py
DEEPER = os.environ.get("RELAY_FUZZ_EXAMPLES")
EXAMPLES = settings(
    max_examples=int(DEEPER or 50),
    derandomize=not DEEPER,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def cases(operation: APIOperation, targets: Targets) -> st.SearchStrategy[Case]:
    """Valid and invalid requests; valid ones also aimed at things that exist (the fixture's
    session, a source, a subscription, a delivery)."""
    fixed = targets.path_parameters(operation)
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if fixed:
        strategies.append(operation.as_strategy(path_parameters=fixed))
    return st.one_of(strategies)


def test_api_conforms_to_its_document(api_schema: BaseSchema, live_relay: LiveRelay) -> None:
    """Generated requests get no 5xx, and every answer matches its documented status and schema."""
    # Mostly the admin key; also keys with one scope only, an unknown key and none.
    keys = [live_relay.key] * 3 + [
        live_relay.create_key(auth.WRITE),
        live_relay.create_key(auth.READ),
        "rk_unknown",
        None,
    ]
    targets = Targets(live_relay)
    tried = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @EXAMPLES
        @given(case=cases(operation, targets), key=st.sampled_from(keys))
        def conforms(case: Case, key: str | None) -> None:
            if case.query and str(case.query.get("wait")).lower() in ("true", "1"):
                case.query["timeout"] = 0  # long polls are bounded by their own tests
            keep_on_loopback(case.body)
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            case.call_and_validate(
                base_url=live_relay.url, headers=headers, checks=CHECKS, timeout=10
            )

        conforms()
        tried.append(f"{operation.method.upper()} {operation.path}")
    # Schemathesis leaves out the document's own path; the streams are excluded above.
    document = requests.get(f"{live_relay.url}/openapi.json", timeout=10).json()
    documented = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if not path.endswith("/stream")
    }
    assert sorted(tried) == sorted(documented - {"GET /openapi.json"})
    assert len(tried) == 32  # 24, the tap (6 methods) and the follows (2)
