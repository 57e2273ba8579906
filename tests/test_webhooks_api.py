"""The subscriptions API and CLI: validation, scopes, secrets at rest, management."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from relay.appkeys import STORE
from relay.auth import READ, create_key
from tests.conftest import Relay, RelayFactory
from tests.receivers import FAST_DELIVERY, api
from tests.test_cli import relay as run_cli

GOOD = {"url": "https://hooks.example.com/relay"}


@pytest.fixture
async def hooks(start_relay: RelayFactory) -> Relay:
    return await start_relay(delivery=FAST_DELIVERY)


@pytest.mark.parametrize(
    ("body", "status", "code", "mentions"),
    [
        (b"not json", 400, "INVALID_JSON", "JSON"),
        (b"[1, 2]", 400, "INVALID_JSON", "object"),
        (b"{}", 400, "INVALID_REQUEST", "url"),
        (b'{"url": "ftp://example.com/x"}', 400, "INVALID_REQUEST", "http"),
        (b'{"url": "/relative"}', 400, "INVALID_REQUEST", "url"),
        (b'{"url": "https://u:p@example.com/"}', 400, "INVALID_REQUEST", "credentials"),
        (b'{"url": "https://example.com/", "ordering": "global"}', 400, "INVALID_REQUEST", "ord"),
        (b'{"url": "https://example.com/", "max_in_flight": 0}', 400, "INVALID_REQUEST", "max"),
        (b'{"url": "https://example.com/", "types": "turn.*"}', 400, "INVALID_REQUEST", "types"),
        (b'{"url": "https://example.com/", "types": [""]}', 400, "INVALID_REQUEST", "types"),
        (b'{"url": "https://example.com/", "colour": "red"}', 400, "INVALID_REQUEST", "colour"),
        (b'{"url": "https://example.com/", "enabled": false}', 400, "INVALID_REQUEST", "enabled"),
    ],
)
async def test_bad_subscription_bodies_are_refused_and_change_nothing(
    hooks: Relay, body: bytes, status: int, code: str, mentions: str
) -> None:
    """Each invalid body gets the error envelope naming the problem; nothing is created."""
    resp = await hooks.client.post(
        "/v1/subscriptions",
        data=body,
        headers={**hooks.auth, "Content-Type": "application/json"},
    )
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] == code
    assert mentions in error["message"]
    assert (await api(hooks, "GET", "/v1/subscriptions"))["items"] == []


async def test_bad_patches_and_unknown_ids(hooks: Relay) -> None:
    """PATCH validates like POST and changes nothing on error; unknown ids are 404 NOT_FOUND."""
    created = await api(hooks, "POST", "/v1/subscriptions", status=201, json=GOOD)
    path = f"/v1/subscriptions/{created['id']}"
    resp = await hooks.client.patch(path, json={"url": "gopher://x"}, headers=hooks.auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_REQUEST"
    assert (await api(hooks, "GET", path))["url"] == GOOD["url"]
    for method, missing in [
        ("GET", "/v1/subscriptions/sub_nope"),
        ("DELETE", "/v1/subscriptions/sub_nope"),
        ("POST", "/v1/subscriptions/sub_nope/test"),
        ("POST", "/v1/subscriptions/sub_nope/enable"),
        ("POST", "/v1/subscriptions/sub_nope/rotate-secret"),
        ("GET", "/v1/subscriptions/sub_nope/deliveries"),
        ("GET", "/v1/deliveries/99999"),
        ("GET", "/v1/deliveries/abc"),
        ("POST", "/v1/deliveries/99999/retry"),
    ]:
        resp = await hooks.client.request(method, missing, headers=hooks.auth)
        assert resp.status == 404, missing
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    for bad in (
        {},
        {"since": "yesterday"},
        {"since": 5},
        {"since": "2024-01-01T00:00:00"},  # no UTC offset
        {"since": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
    ):
        resp = await hooks.client.post(f"{path}/recover", json=bad, headers=hooks.auth)
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "INVALID_REQUEST"
    resp = await hooks.client.get(f"{path}/deliveries?status=lost", headers=hooks.auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_patch_list_and_delete(hooks: Relay) -> None:
    """A subscription can be changed, paused, listed and removed; its secret is never listed."""
    created = await api(hooks, "POST", "/v1/subscriptions", status=201, json=GOOD)
    path = f"/v1/subscriptions/{created['id']}"
    patched = await api(
        hooks,
        "PATCH",
        path,
        json={"types": ["turn.*"], "ordering": "session", "max_in_flight": 3, "enabled": False},
    )
    assert patched["types"] == ["turn.*"]
    assert patched["ordering"] == "session"
    assert patched["max_in_flight"] == 3
    assert patched["enabled"] is False
    assert patched["disabled_reason"] == "disabled through the API"
    listing = await api(hooks, "GET", "/v1/subscriptions")
    assert [s["id"] for s in listing["items"]] == [created["id"]]
    assert "secret" not in listing["items"][0]
    await api(hooks, "DELETE", path, status=204)
    assert (await api(hooks, "GET", "/v1/subscriptions"))["items"] == []


async def test_subscriptions_are_listed_a_page_at_a_time(hooks: Relay) -> None:
    """Pages follow `next_after` oldest first, without gaps or repeats, and end with null;
    deleting a page's items (its last one too) does not disturb the next; bad values: 400."""
    made = [
        (await api(hooks, "POST", "/v1/subscriptions", status=201, json=GOOD))["id"]
        for _ in range(7)
    ]
    first = await api(hooks, "GET", "/v1/subscriptions?limit=3")
    assert [s["id"] for s in first["items"]] == made[:3]
    assert isinstance(first["next_after"], int)
    for subscription_id in made[1:4]:  # the cursor's own subscription, and the next page's first
        await api(hooks, "DELETE", f"/v1/subscriptions/{subscription_id}", status=204)
    second = await api(hooks, "GET", f"/v1/subscriptions?limit=3&after={first['next_after']}")
    assert [s["id"] for s in second["items"]] == made[4:7]
    last = await api(hooks, "GET", f"/v1/subscriptions?limit=3&after={second['next_after']}")
    assert last == {"items": [], "next_after": None}
    everything = await api(hooks, "GET", "/v1/subscriptions")
    assert [s["id"] for s in everything["items"]] == [made[0], *made[4:]]
    assert everything["next_after"] is None
    for query in ("after=-1", "after=sub_x", "limit=0", "limit=1001", "limit=x"):
        resp = await hooks.client.get(f"/v1/subscriptions?{query}", headers=hooks.auth)
        assert resp.status == 400, query
        assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_management_needs_the_write_scope(hooks: Relay) -> None:
    """Without a key: 401; with a read-only key: 403; nothing is created either way."""
    resp = await hooks.client.post("/v1/subscriptions", json=GOOD)
    assert resp.status == 401
    keyed = await api(
        hooks,
        "POST",
        "/v1/subscriptions",
        status=201,
        json={"url": "https://example.com/a"},
    )
    reader = await create_key(hooks.client.app[STORE], "reader", (READ,))
    headers = {"Authorization": f"Bearer {reader.secret}"}
    for method, path in [
        ("POST", "/v1/subscriptions"),
        ("GET", "/v1/subscriptions"),
        ("DELETE", f"/v1/subscriptions/{keyed['id']}"),
    ]:
        resp = await hooks.client.request(method, path, json=GOOD, headers=headers)
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert len((await api(hooks, "GET", "/v1/subscriptions"))["items"]) == 1


async def test_secrets_are_encrypted_at_rest(hooks: Relay, tmp_path: Path) -> None:
    """Neither the current nor the rotated-out secret is stored in clear; the key file is 0600."""
    created = await api(hooks, "POST", "/v1/subscriptions", status=201, json=GOOD)
    rotated = await api(hooks, "POST", f"/v1/subscriptions/{created['id']}/rotate-secret")
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        rows: list[Any] = conn.execute(
            "SELECT secret, previous_secrets FROM subscriptions"
        ).fetchall()
    stored = b"".join(v if isinstance(v, bytes) else v.encode() for row in rows for v in row)
    assert len(json.loads(rows[0][1])) == 1
    for secret in (created["secret"], rotated["secret"]):
        assert secret.encode() not in stored
        assert secret.removeprefix("whsec_").encode() not in stored
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600


def test_cli_adds_lists_and_removes_subscriptions(tmp_path: Path) -> None:
    """`relay subscriptions add` prints the secret last; list shows it; remove deletes it."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/cli.db"\n')
    run_cli(config, "migrate")
    added = run_cli(
        config, "subscriptions", "add", "https://example.com/hook", "--type", "turn.*"
    ).stdout
    secret = added.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    sub_id = added.split()[1]
    listing = run_cli(config, "subscriptions", "list").stdout
    assert sub_id in listing
    assert "turn.*" in listing
    assert secret not in listing
    assert f"removed {sub_id}" in run_cli(config, "subscriptions", "remove", sub_id).stdout
    assert "no subscriptions" in run_cli(config, "subscriptions", "list").stdout
    assert run_cli(config, "subscriptions", "remove", sub_id, check=False).returncode == 1
    bad = run_cli(config, "subscriptions", "add", "ftp://example.com", check=False)
    assert bad.returncode == 2
    assert "http" in bad.stderr
