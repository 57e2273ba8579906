"""A stream resuming far behind catches up from the store while ingest runs, uncut."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import RelayFactory
from tests.test_ingest import signed
from tests.test_sse import frames, is_change
from tests.test_sse_resume import _all_changes, events

BEFORE = 600  # events stored before the client resumes


async def test_resuming_subscriber_under_steady_ingest_is_not_cut_off(
    start_relay: RelayFactory,
) -> None:
    """With a live buffer of 4 changes and ingest running during its replay, a stream
    resumed from the start reads the log up to the head and goes live on one connection,
    every change once and in order."""
    relay = await start_relay(sse={"buffer_changes": 4, "heartbeat_seconds": 0.2})
    bodies = [orjson.dumps(e) for e in events()]

    async def post(chunk: list[bytes]) -> None:
        await asyncio.gather(
            *(relay.client.post("/v1/ingest/casedev", data=b, headers=signed(b)) for b in chunk)
        )

    for start in range(0, BEFORE, 50):
        await post(bodies[start : start + 50])
    started = asyncio.Event()

    async def produce() -> None:
        await started.wait()
        for start in range(BEFORE, len(bodies), 4):
            await post(bodies[start : start + 4])

    producing = asyncio.create_task(produce())
    received: list[int] = []
    connections = 0
    final: int | None = None

    async def follow() -> None:
        nonlocal connections, final
        params = {"last_event_id": "0"}
        async with relay.client.get("/v1/stream", params=params, headers=relay.auth) as resp:
            connections += 1
            started.set()
            async for frame in frames(resp):
                if is_change(frame):
                    received.append(int(frame["id"]))
                    await asyncio.sleep(0)  # a reader that takes its time
                if final is None and producing.done():
                    final = int((await _all_changes(relay))[-1]["id"])
                if final is not None and received and received[-1] >= final:
                    return

    await asyncio.wait_for(follow(), timeout=120)
    await producing
    expected = [int(c["id"]) for c in await _all_changes(relay)]
    assert connections == 1
    assert received == expected
    assert len(expected) > 1500


async def test_resumed_streams_of_one_session_or_exact_types_replay_just_those(
    start_relay: RelayFactory,
) -> None:
    """A stream of one session, or of exact type names, resumed from the start replays
    exactly the matching changes in id order, then says where the live part begins."""
    relay = await start_relay(sse={"heartbeat_seconds": 0.2})
    for body in (orjson.dumps(e) for e in events()[:200]):
        await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    everything = await _all_changes(relay)
    cases = [
        ("/v1/sessions/chat_03/stream", {}, lambda c: c["session_id"] == "chat_03"),
        ("/v1/stream", {"session_id": "chat_05"}, lambda c: c["session_id"] == "chat_05"),
        (
            "/v1/stream",
            {"type": "session.ready,turn.completed"},
            lambda c: c["type"] in ("session.ready", "turn.completed"),
        ),
    ]
    for path, params, wanted in cases:
        want = [int(c["id"]) for c in everything if wanted(c)]
        got: list[int] = []
        query = {**params, "last_event_id": "0"}
        async with relay.client.get(path, params=query, headers=relay.auth) as resp:
            assert resp.status == 200
            async for frame in frames(resp):
                if is_change(frame):
                    got.append(int(frame["id"]))
                if frame.get("event") == "stream.position":
                    break
        assert got == want
        assert len(want) > 5
