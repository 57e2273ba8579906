"""Resume under load: a client that keeps disconnecting still gets every change once."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from tests.conftest import Relay, RelayFactory
from tests.test_ingest import signed
from tests.test_sse import frames, is_change

SESSIONS = 84  # x 24 changes each: 2,016 changes
EVENTS_PER_SESSION = 25  # created, reused, ready, then started/completed turns
DISCONNECTS = 20


def events() -> list[dict[str, object]]:
    kinds = ["agent.chat.session.created", "agent.runtime.reused", "agent.worker.ready"]
    out = []
    for s in range(SESSIONS):
        for n in range(EVENTS_PER_SESSION):
            if n < 3:
                kind, data = kinds[n], {"chatId": f"chat_{s:02d}"}
            else:
                turn = f"turn_{(n - 3) // 2:02d}"
                kind = "agent.chat.turn.started" if n % 2 else "agent.chat.turn.completed"
                data = {"chatId": f"chat_{s:02d}", "turnId": turn}
            second = n
            out.append(
                {
                    "id": f"evt_{s:02d}_{n:02d}",
                    "type": kind,
                    "occurred_at": f"2026-11-20T09:00:{second:02d}.000Z",
                    "data": data,
                }
            )
    return out


@pytest.mark.parametrize("type_filter", ["", "turn.*"])
async def test_client_resuming_20_times_during_load_gets_every_change_once(
    start_relay: RelayFactory, type_filter: str
) -> None:
    """While 2,000 changes are produced, 20 random disconnects lose and repeat nothing."""
    relay = await start_relay(sse={"heartbeat_seconds": 0.2})  # heartbeats end idle waits
    rng = random.Random(7)
    stop_after = sorted(rng.sample(range(1, 1500), DISCONNECTS))
    received: list[dict[str, object]] = []
    last_id = 0

    async def produce() -> None:
        batch = events()
        for start in range(0, len(batch), 8):
            await asyncio.gather(
                *(
                    relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
                    for body in (orjson.dumps(e) for e in batch[start : start + 8])
                )
            )

    producing = asyncio.create_task(produce())
    final: int | None = None  # the last matching change id, once production is over
    reconnects = 0
    while final is None or last_id < final:
        params = {"last_event_id": str(last_id)}
        if type_filter:
            params["type"] = type_filter
        async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
            reconnects += 1
            async for frame in frames(resp):
                if "id" in frame:
                    last_id = int(frame["id"])
                if is_change(frame):
                    received.append(orjson.loads(frame["data"]))
                if final is None and producing.done():
                    final = await _last_matching(relay, type_filter)
                if final is not None and last_id >= final:
                    break
                if stop_after and len(received) >= stop_after[0]:
                    stop_after.pop(0)
                    break  # disconnect in the middle of the stream
    await producing

    expected = [
        c["id"]
        for c in await _all_changes(relay)
        if not type_filter or str(c["type"]).startswith("turn.")
    ]
    ids = [c["id"] for c in received]
    assert reconnects >= DISCONNECTS + 1
    assert ids == expected  # every matching change, once, in order
    assert len(expected) >= (2000 if not type_filter else 1800)


async def _all_changes(relay: Relay) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    after = 0
    while True:
        resp = await relay.client.get(
            "/v1/changes", params={"after": after, "limit": 1000}, headers=relay.auth
        )
        page = await resp.json()
        items += page["items"]
        if page["next_after"] is None:
            return items
        after = page["next_after"]


async def _last_matching(relay: Relay, type_filter: str) -> int:
    changes = await _all_changes(relay)
    matching = [c for c in changes if not type_filter or str(c["type"]).startswith("turn.")]
    return int(matching[-1]["id"]) if matching else 0
