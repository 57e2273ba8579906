"""The hub contract, held by the in-process hub and the Redis hub alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.changes import Commit, StoredChange
from relay.hub import Hub, InProcessHub
from tests.hub_support import ChangeLog, Received, everything, nothing, redis_hub, running
from tests.receivers import eventually


@pytest.fixture(params=["memory", "redis"])
def redis_target(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for the in-process hub; the Redis URL and a namespace for the Redis hub."""
    if request.param == "memory":
        return None
    target: tuple[str, str] = request.getfixturevalue("redis_namespace")
    return target


@pytest.fixture
async def hub_and_log(
    redis_target: tuple[str, str] | None,
) -> AsyncIterator[tuple[Hub, ChangeLog]]:
    """A running hub of each kind, with the change log it reads."""
    log = ChangeLog()
    hub: Hub = InProcessHub() if redis_target is None else redis_hub(*redis_target, log)
    async with running(hub):
        yield hub, log


async def test_published_changes_reach_every_subscriber_in_order(
    hub_and_log: tuple[Hub, ChangeLog],
) -> None:
    """Each subscriber gets every published change once, in id order."""
    hub, log = hub_and_log
    first, second = Received(), Received()
    with (
        hub.subscribe(everything, 100, nothing) as one,
        hub.subscribe(everything, 100, nothing) as two,
    ):
        one.deliver_to(first)
        hub.publish(log.append(2))
        hub.publish(log.append(3))
        await eventually(lambda: len(first.ids) >= 5)
        assert two.deliver_to(second) == log.changes  # buffered until it took them
        hub.publish(log.append(1))
        await eventually(lambda: len(first.ids) >= 6 and len(second.ids) >= 1)
    assert first.ids == [1, 2, 3, 4, 5, 6]
    assert second.ids == [6]


async def test_subscription_gets_only_what_it_accepts(hub_and_log: tuple[Hub, ChangeLog]) -> None:
    """A subscription's filter decides which changes reach it."""
    hub, log = hub_and_log
    received = Received()

    def only_s2(change: StoredChange) -> bool:
        return change.session_id == "s2"

    with hub.subscribe(only_s2, 100, nothing) as subscription:
        subscription.deliver_to(received)
        hub.publish(log.append(2, "s1"))
        hub.publish(log.append(2, "s2"))
        hub.publish(log.append(1, "s1"))
        await eventually(lambda: len(received.ids) >= 2)
        witness = Received()  # everything published has arrived once this has all of it
        with hub.subscribe(everything, 100, nothing) as last:
            last.deliver_to(witness)
            hub.publish(log.append(1, "s2"))
            await eventually(lambda: witness.ids == [6])
    assert received.ids == [3, 4, 6]


async def test_full_buffer_overflows_the_subscription(hub_and_log: tuple[Hub, ChangeLog]) -> None:
    """A subscriber whose buffer fills is marked overflowed, told once, and gets nothing more."""
    hub, log = hub_and_log
    told: list[bool] = []
    with hub.subscribe(everything, 3, lambda: told.append(True)) as subscription:
        hub.publish(log.append(2))
        hub.publish(log.append(2))
        await eventually(lambda: subscription.overflowed)
        hub.publish(log.append(1))
        assert await subscription.ended(0.01)
        assert subscription.deliver_to(Received()) == []
    assert told == [True]


async def test_session_watch_wakes_on_its_session_only(hub_and_log: tuple[Hub, ChangeLog]) -> None:
    """A session watch wakes when a commit touches its session, not on other sessions."""
    hub, log = hub_and_log
    with hub.watch_session("s1") as mine, hub.watch_session("s2") as other:
        assert hub.watching == 2
        hub.publish(log.append(1, "s1"))
        assert await mine.wait(10)
        assert not await other.wait(0.05)
        hub.publish(Commit([], {"s2": 7}))  # a commit that only moves a session's version
        assert await other.wait(10)
    assert hub.watching == 0


async def test_commit_listeners_get_every_commit(hub_and_log: tuple[Hub, ChangeLog]) -> None:
    """Commit listeners (the dispatcher's wake-up) see each change once, in id order."""
    hub, log = hub_and_log
    seen: list[int] = []
    hub.add_commit_listener(lambda commit: seen.extend(c.id for c in commit.changes))
    for size in (1, 3, 2):
        hub.publish(log.append(size))
    await eventually(lambda: len(seen) >= 6)
    assert seen == [1, 2, 3, 4, 5, 6]


async def test_close_ends_every_subscription(hub_and_log: tuple[Hub, ChangeLog]) -> None:
    """Closing the hub ends open subscriptions, and one opened afterwards ends at once."""
    hub, _ = hub_and_log
    with hub.subscribe(everything, 10, nothing) as open_one:
        assert hub.subscribers == 1
        hub.close()
        assert open_one.closed
        assert await open_one.ended(0.01)
        with hub.subscribe(everything, 10, nothing) as late:
            assert late.closed
            assert await late.ended(0.01)
    assert hub.subscribers == 0
