"""API keys on the read API: 401 without a valid key, 403 with the wrong scope."""

from __future__ import annotations

from relay.appkeys import STORE
from relay.auth import create_key
from relay.timefmt import format_time, utcnow
from tests.conftest import Relay, RelayFactory


async def test_bootstrap_key_reads_events(relay: Relay) -> None:
    """The key made on first start has both scopes and reads /v1/events."""
    assert relay.key.startswith("rk_")
    resp = await relay.client.get("/v1/events", headers=relay.auth)
    assert resp.status == 200
    assert await resp.json() == {"items": [], "next_after": None}


async def test_missing_or_unknown_key_is_401(relay: Relay) -> None:
    """No key, a malformed header or an unknown key gets 401 UNAUTHORIZED."""
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer rk_nope"}):
        resp = await relay.client.get("/v1/events", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"


async def test_access_token_query_parameter_is_accepted(relay: Relay) -> None:
    """The key may be given as ?access_token= on a stream (for EventSource)."""
    params = {"access_token": relay.key}
    async with relay.client.get("/v1/stream", params=params) as resp:
        assert resp.status == 200


async def test_wrong_scope_is_403_and_revoked_key_is_401(relay: Relay) -> None:
    """A write-only key is 403 FORBIDDEN on a read endpoint; a revoked key is 401."""
    store = relay.client.app[STORE]
    writer = await create_key(store, "writer", ("agent:write",))
    headers = {"Authorization": f"Bearer {writer.secret}"}
    resp = await relay.client.get("/v1/events", headers=headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    reader = await create_key(store, "reader", ("agent:read",))
    assert await store.revoke_api_key(reader.key.id, format_time(utcnow()))
    resp = await relay.client.get(
        "/v1/events", headers={"Authorization": f"Bearer {reader.secret}"}
    )
    assert resp.status == 401


async def test_auth_disabled_needs_no_key(start_relay: RelayFactory) -> None:
    """With auth.enabled = false the read API is open and no bootstrap key is made."""
    relay = await start_relay(auth={"enabled": False})
    assert relay.key == ""
    assert (await relay.client.get("/v1/events")).status == 200


async def test_bad_paging_parameters_are_400(relay: Relay) -> None:
    """Non-numeric or out-of-range after/limit get 400 INVALID_PARAMETER."""
    for params in ({"after": "x"}, {"limit": "0"}, {"limit": "5000"}, {"after": "-1"}):
        resp = await relay.client.get("/v1/events", params=params, headers=relay.auth)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_unknown_route_and_method_use_the_envelope(relay: Relay) -> None:
    """Unknown paths are 404 NOT_FOUND and wrong methods 405, in the error envelope."""
    resp = await relay.client.get("/v1/nothing")
    assert (resp.status, (await resp.json())["error"]["code"]) == (404, "NOT_FOUND")
    resp = await relay.client.get("/v1/ingest/casedev")
    assert (resp.status, (await resp.json())["error"]["code"]) == (405, "METHOD_NOT_ALLOWED")
    assert "POST" in resp.headers["Allow"]


async def test_metrics_count_ingest_outcomes(relay: Relay) -> None:
    """/metrics parses and its ingest counters move with stored, duplicate and bad requests."""
    import orjson
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import fixture_events
    from tests.test_ingest import signed

    body = orjson.dumps(fixture_events()[0])
    for headers in (signed(body), signed(body), {}):
        await relay.client.post("/v1/ingest/casedev", data=body, headers=headers)
    text = await (await relay.client.get("/metrics")).text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("relay_ingest_total", (("outcome", "stored"), ("source", "casedev")))] == 1
    assert samples[("relay_ingest_total", (("outcome", "duplicate"), ("source", "casedev")))] == 1
    key = ("relay_ingest_total", (("outcome", "MISSING_SIGNATURE"), ("source", "casedev")))
    assert samples[key] == 1
    assert samples[("relay_ingest_duration_seconds_count", (("source", "casedev"),))] == 2
