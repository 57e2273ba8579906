"""The lane: slots for work that can wait, one per event loop iteration, in turn, and
none held up by a waiter cancelled at any point."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.connectors.lane import Lane


@pytest.fixture
async def iterations() -> AsyncIterator[list[int]]:
    """The number of event loop iterations run so far, counted by a callback that runs
    once in each."""
    loop = asyncio.get_running_loop()
    count = [0]
    handle: list[asyncio.Handle] = []

    def tick() -> None:
        count[0] += 1
        handle[:] = [loop.call_soon(tick)]

    handle.append(loop.call_soon(tick))
    yield count
    handle[0].cancel()


async def test_slots_come_one_per_loop_iteration_back_to_back_and_in_turn(
    iterations: list[int],
) -> None:
    """Three streams asking four times each: one slot per iteration, in consecutive
    iterations while nothing else runs, each stream after the others."""
    lane = Lane()
    slots: list[tuple[str, int]] = []

    async def work(name: str) -> None:
        for _ in range(4):
            await lane.turn()
            slots.append((name, iterations[0]))

    await asyncio.gather(*(work(name) for name in "abc"))
    assert [name for name, _ in slots] == list("abc" * 4)
    at = [iteration for _, iteration in slots]
    assert at == list(range(at[0], at[0] + 12))


async def test_a_slot_comes_after_what_is_ready_when_it_is_asked_for() -> None:
    """Callbacks ready when a slot is asked for (chunks to pass on) run before it."""
    lane = Lane()
    loop = asyncio.get_running_loop()
    ran: list[str] = []

    async def work() -> None:
        await lane.turn()
        ran.append("slot")

    task = asyncio.create_task(work())
    for i in range(3):
        loop.call_soon(ran.append, f"ready {i}")
    await task
    assert ran == ["ready 0", "ready 1", "ready 2", "slot"]


@pytest.mark.parametrize("yields", range(5))
async def test_a_waiter_cancelled_before_or_after_its_slot_holds_no_one_up(yields: int) -> None:
    """However far a waiter got (asking, granted, running), cancelling it leaves the
    next waiter its slot and the lane serving."""
    lane = Lane()
    first = asyncio.create_task(lane.turn())
    second = asyncio.create_task(lane.turn())
    for _ in range(yields):
        await asyncio.sleep(0)  # one loop iteration, not a wait for time
    first.cancel()
    done, _ = await asyncio.wait([second], timeout=10)
    assert done == {second}, "the cancelled waiter held the next one up"
    later = asyncio.create_task(lane.turn())
    done, _ = await asyncio.wait([later], timeout=10)
    assert done == {later}, "the lane stopped serving"
