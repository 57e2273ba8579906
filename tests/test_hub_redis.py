"""The Redis hub across instances: order, gaps, large commits, and Redis going away."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from relay.appkeys import HUB, STORE
from relay.changes import Commit, StoredChange
from relay.config import HubSettings, Settings
from relay.hub import InProcessHub, open_hub
from relay.hub_order import Sequencer
from relay.hub_redis import MAX_MESSAGE_BYTES, RedisHub, Throttle, backoff
from relay.hub_wire import BadMessage, decode, encode, sent_by
from tests.conftest import RelayFactory, fixture_events
from tests.hub_support import ChangeLog, Received, change, everything, nothing, redis_hub, running
from tests.receivers import eventually
from tests.redis_server import RedisServer
from tests.tcp_proxy import TcpProxy
from tests.test_read_api import ingest

QUIET = 3600.0  # a catch-up interval that never elapses: only Redis carries changes


async def connected(*hubs: RedisHub) -> None:
    await eventually(lambda: all(hub.stats.connected for hub in hubs))


def test_message_round_trips_bodies_byte_for_byte() -> None:
    """A commit decodes from its message with the exact bodies, ids and sessions."""
    bodies = [b'{"a":"x\\ny"}', '{"é":1}'.encode(), b"{}"]
    changes = [StoredChange(n + 1, "t", "s", None if n else "u", b) for n, b in enumerate(bodies)]
    message = decode(encode("me", Commit(changes, {"s": 4}), 1000))
    assert message.origin == "me"
    assert message.commit == Commit(changes, {"s": 4})
    assert [c.body for c in message.commit.changes] == bodies
    assert message.through is None


def test_a_hubs_own_messages_are_known_by_their_first_bytes() -> None:
    """Every message a hub encodes, whole or ids only, begins with its `sent_by` bytes;
    another hub's, even one whose id extends it, does not."""
    commit = Commit([change(7), change(8)], {"s1": 2})
    for limit in (10, 1000):
        assert encode("me", commit, limit).startswith(sent_by("me"))
        assert not encode("meet", commit, limit).startswith(sent_by("me"))


def test_large_commit_goes_as_ids_only() -> None:
    """A commit over the size limit is sent without its changes, naming the last id."""
    message = decode(encode("me", Commit([change(7), change(8)], {"s1": 2}), 10))
    assert message.commit == Commit([], {"s1": 2})
    assert message.through == 8


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json\n",
        b'{"o":"x"}\n',
        b'{"o":"x","s":{},"c":[[1,"t","s",null,5]]}\nab',
        b'{"o":"x","s":{},"c":[[0,"t","s",null,0]]}\n',
        b'{"o":"x","s":{},"r":true}\n',
    ],
)
def test_bad_messages_are_refused(data: bytes) -> None:
    """Anything but a well-formed commit message is BadMessage."""
    with pytest.raises(BadMessage):
        decode(data)


def test_backoff_doubles_up_to_a_cap() -> None:
    """Reconnect delays double from 0.1 s and stay under 6 s, jitter included."""
    assert backoff(0, lambda: 0.0) == pytest.approx(0.1)
    assert backoff(3, lambda: 0.0) == pytest.approx(0.8)
    assert backoff(40, lambda: 1.0) == pytest.approx(6.0)


def test_throttle_lets_one_warning_through_per_interval() -> None:
    """A throttled warning passes once per interval and reports how many it held back."""
    now = [0.0]
    throttle = Throttle(10.0, lambda: now[0])
    assert throttle.allow() == 0
    assert throttle.allow() is None
    assert throttle.allow() is None
    now[0] = 10.0
    assert throttle.allow() == 2


async def test_open_hub_chooses_by_url_scheme() -> None:
    """memory:// gives the in-process hub, redis:// the Redis hub."""
    log = ChangeLog()
    memory = open_hub(HubSettings(), log.read_changes, log.last_change_id)
    assert isinstance(memory, InProcessHub)
    redis = open_hub(HubSettings(url="redis://127.0.0.1:1/0"), log.read_changes, log.last_change_id)
    assert isinstance(redis, RedisHub)


def test_config_refuses_unknown_hub_urls() -> None:
    """A hub URL of another scheme is a configuration error."""
    with pytest.raises(ValueError, match="hub URLs"):
        Settings(hub={"url": "kafka://broker"})


@pytest.fixture
async def hubs(redis_namespace: tuple[str, str]) -> AsyncIterator[tuple[ChangeLog, list[RedisHub]]]:
    """Three running Redis hubs on one namespace (three relay instances), one change log."""
    url, prefix = redis_namespace
    log = ChangeLog()
    three = [redis_hub(url, prefix, log, catch_up_interval_seconds=QUIET) for _ in range(3)]
    async with running(three[0]), running(three[1]), running(three[2]):
        await connected(*three)
        await eventually(lambda: log.reads >= 3)  # each has caught up once on connecting
        yield log, three


async def test_commit_on_one_instance_reaches_the_others(
    hubs: tuple[ChangeLog, list[RedisHub]],
) -> None:
    """Subscribers, session watches and commit listeners on another instance get a commit
    through Redis, in id order."""
    log, (a, b, _) = hubs
    got, woken = Received(), []
    b.add_commit_listener(lambda commit: woken.extend(c.id for c in commit.changes))
    with b.subscribe(everything, 100, nothing) as subscription, b.watch_session("s9") as watch:
        subscription.deliver_to(got)
        a.publish(log.append(2, "s1"))
        a.publish(log.append(3, "s9"))
        assert await watch.wait(10)
        await eventually(lambda: len(got.ids) >= 5)
    assert got.ids == woken == [1, 2, 3, 4, 5]
    assert b.stats.received == 2
    assert b.last_delivered == 5


async def test_commits_out_of_id_order_are_delivered_in_order(
    hubs: tuple[ChangeLog, list[RedisHub]],
) -> None:
    """A commit that arrives before a lower one is delivered after the missing ids, read
    from the log; the late commit is then dropped, not delivered twice."""
    log, (a, b, c) = hubs
    received = [Received() for _ in range(3)]
    first, second = log.append(3), log.append(3)
    with (
        a.subscribe(everything, 100, nothing) as on_a,
        b.subscribe(everything, 100, nothing) as on_b,
        c.subscribe(everything, 100, nothing) as on_c,
    ):
        for subscription, into in zip((on_a, on_b, on_c), received, strict=True):
            subscription.deliver_to(into)
        c.publish(second)
        await eventually(lambda: len(received[1].ids) >= 6)
        a.publish(first)
        await eventually(lambda: b.stats.received == 2 and c.stats.received == 1)
        await eventually(lambda: all(len(r.ids) >= 6 for r in received))
        assert b.stats.received == 2  # the late commit came, and was dropped
    for into in received:
        assert into.ids == [1, 2, 3, 4, 5, 6]
    assert b.last_delivered == 6


async def test_interleaved_commits_from_many_instances_arrive_once_in_order(
    hubs: tuple[ChangeLog, list[RedisHub]],
) -> None:
    """Commits published in shuffled order from three instances reach every instance's
    subscriber each once, in id order."""
    log, three = hubs
    commits = [log.append(random.randint(1, 4), f"s{n % 7}") for n in range(120)]
    order = list(enumerate(commits))
    random.Random(12).shuffle(order)
    received = [Received() for _ in three]
    with (
        three[0].subscribe(everything, 10_000, nothing) as s0,
        three[1].subscribe(everything, 10_000, nothing) as s1,
        three[2].subscribe(everything, 10_000, nothing) as s2,
    ):
        for subscription, into in zip((s0, s1, s2), received, strict=True):
            subscription.deliver_to(into)
        for position, (n, commit) in enumerate(order):
            three[n % 3].publish(commit)
            if position % 10 == 0:
                await asyncio.sleep(0)  # let the publishers and listeners run in between
        total = len(log.changes)
        await eventually(lambda: all(len(r.ids) >= total for r in received))
    for into in received:
        assert into.ids == list(range(1, total + 1))


async def test_a_commit_too_large_for_a_message_is_read_from_the_log(
    hubs: tuple[ChangeLog, list[RedisHub]],
) -> None:
    """A commit over the message size reaches other instances through the log."""
    log, (a, b, _) = hubs
    big = StoredChange(1, "turn.started", "s1", None, b'{"x":"' + b"y" * MAX_MESSAGE_BYTES + b'"}')
    log.changes.append(big)
    got = Received()
    with b.subscribe(everything, 10, nothing) as subscription:
        subscription.deliver_to(got)
        a.publish(Commit([big], {"s1": 1}))
        await eventually(lambda: got.ids == [1])
    assert got.changes[0].body == big.body
    assert b.stats.received == 1


async def test_streams_go_on_through_a_redis_outage(tmp_path: Path) -> None:
    """With Redis killed for a while and started again, publishing never fails, every
    subscriber gets every change once, in order, during the outage and after, and
    session watches still wake."""
    server = RedisServer(tmp_path)
    await server.start()
    log = ChangeLog()
    a, b = (redis_hub(server.url, "outage", log, catch_up_interval_seconds=0.2) for _ in "ab")
    got_a, got_b = Received(), Received()

    async def publish_for(seconds: float, count: int) -> None:
        """Publish `count` commits, spread over `seconds`, alternating instances."""
        for n in range(count):
            (a, b)[n % 2].publish(log.append(1, f"s{n % 5}"))
            await asyncio.sleep(seconds / count)

    try:
        async with running(a), running(b):
            await connected(a, b)
            with (
                a.subscribe(everything, 10_000, nothing) as on_a,
                b.subscribe(everything, 10_000, nothing) as on_b,
            ):
                on_a.deliver_to(got_a)
                on_b.deliver_to(got_b)
                await publish_for(0.5, 50)
                await eventually(lambda: len(got_a.ids) == len(got_b.ids) == 50)
                server.stop()
                outage_started = time.monotonic()
                await publish_for(3.0, 150)
                # Redis is down: the changes arrive all the same (from the log).
                await eventually(lambda: len(got_a.ids) == len(got_b.ids) == 200)
                assert not a.stats.connected
                assert not b.stats.connected
                with b.watch_session("waiting") as watch:
                    a.publish(log.append(1, "waiting"))
                    assert await watch.wait(10)
                assert time.monotonic() - outage_started >= 3.0
                received_before = b.stats.received
                await server.start()
                await eventually(lambda: a.stats.connected and b.stats.connected, within=60)
                await publish_for(0.5, 50)
                await eventually(lambda: len(got_a.ids) == len(got_b.ids) == 251)
                await eventually(lambda: b.stats.received > received_before)  # Redis again
    finally:
        server.stop()
    assert got_a.ids == got_b.ids == list(range(1, 252))
    assert a.stats.dropped + b.stats.dropped > 0  # the outage did cost messages
    assert a.stats.connects >= 2
    assert b.stats.connects >= 2


async def test_relay_publishes_its_commits_to_other_instances(
    start_relay: RelayFactory, redis_namespace: tuple[str, str]
) -> None:
    """A relay with a redis:// hub sends its committed changes to another instance."""
    url, prefix = redis_namespace
    relay = await start_relay(hub={"url": url, "prefix": prefix})
    hub = relay.client.app[HUB]
    assert isinstance(hub, RedisHub)
    store = relay.client.app[STORE]
    other = RedisHub(
        HubSettings(url=url, prefix=prefix, catch_up_interval_seconds=QUIET),
        store.list_changes,
        store.last_change_id,
    )
    got = Received()
    async with running(other):
        await connected(hub, other)
        with other.subscribe(everything, 1000, nothing) as subscription:
            subscription.deliver_to(got)
            for event in fixture_events():
                await ingest(relay, event)
            logged = [c.id for c in await store.list_changes(0, 1000)]
            await eventually(lambda: got.ids == logged)
    assert other.stats.received > 0
    assert orjson.loads(got.changes[0].body)["id"] == logged[0]
    metrics = await (await relay.client.get("/metrics", headers=relay.auth)).text()
    published = metrics.split('relay_hub_commits_total{outcome="published"} ')[1].split()[0]
    assert float(published) >= 1
    assert "relay_hub_connected 1.0" in metrics


async def test_embedded_relay_has_no_hub_metrics(start_relay: RelayFactory) -> None:
    """With the in-process hub, no cross-instance hub metrics are exposed."""
    relay = await start_relay()
    metrics = await (await relay.client.get("/metrics", headers=relay.auth)).text()
    assert "relay_sse_subscribers" in metrics
    assert "relay_hub_" not in metrics


class Delivered:
    """What a sequencer hands to the local hub."""

    def __init__(self) -> None:
        self.commits: list[Commit] = []

    def __call__(self, commit: Commit) -> None:
        self.commits.append(commit)

    @property
    def ids(self) -> list[int]:
        return [c.id for commit in self.commits for c in commit.changes]


async def test_sequencer_holds_a_commit_until_the_one_before_it_arrives() -> None:
    """A commit ahead of a gap waits; the missing commit then releases both, in order,
    without reading the log."""
    log, delivered, now = ChangeLog(), Delivered(), [0.0]
    first, second = log.append(2), log.append(2)
    sequencer = Sequencer(delivered, log.read_changes, gap_wait=0.02, clock=lambda: now[0])
    await sequencer.offer(second)
    assert delivered.ids == []
    assert sequencer.fill_due_in() == pytest.approx(0.02)
    await sequencer.offer(first)
    assert delivered.ids == [1, 2, 3, 4]
    assert sequencer.fill_due_in() is None
    assert log.reads == 0


async def test_sequencer_fills_a_gap_from_the_log_when_the_wait_is_over() -> None:
    """When the missing ids do not come in time they are read from the log, and the
    commit that comes late is then dropped."""
    log, delivered, now = ChangeLog(), Delivered(), [0.0]
    first, second = log.append(2, "a"), log.append(2, "b")
    sequencer = Sequencer(delivered, log.read_changes, gap_wait=0.02, clock=lambda: now[0])
    await sequencer.offer(second)
    now[0] = 0.03
    assert sequencer.fill_due_in() == 0.0
    await sequencer.fill()
    assert delivered.ids == [1, 2, 3, 4]
    assert delivered.commits[0].sessions == {"a": 0}  # the filled changes wake their sessions
    await sequencer.offer(first)
    assert delivered.ids == [1, 2, 3, 4]
    assert sequencer.filled == 2


async def test_sequencer_goes_past_a_hole_in_the_log() -> None:
    """Ids the log does not hold (pruned) do not stop delivery."""
    log, delivered = ChangeLog(), Delivered()
    log.append(5)
    del log.changes[1:3]  # ids 2 and 3 are gone
    sequencer = Sequencer(delivered, log.read_changes)
    await sequencer.offer(Commit([log.changes[-1]], {"s1": 5}))
    assert delivered.ids == [1, 4, 5]
    await sequencer.catch_up()
    assert delivered.ids == [1, 4, 5]


async def test_idle_subscription_stays_connected_through_pings(
    redis_namespace: tuple[str, str],
) -> None:
    """A quiet subscription is pinged and, while Redis answers, kept (no reconnects)."""
    url, prefix = redis_namespace
    log = ChangeLog()
    hub = RedisHub(HubSettings(url=url, prefix=prefix), log.read_changes, log.last_change_id, 0.05)
    async with running(hub):
        await eventually(lambda: hub.stats.pings >= 8)
        assert hub.stats.connects == 1
        assert hub.stats.connected


async def test_silent_partition_is_noticed_and_caught_up(
    redis_namespace: tuple[str, str],
) -> None:
    """When Redis goes silent without closing the connection, the hub notices, keeps its
    streams going from the log, and resubscribes once Redis answers again."""
    url, prefix = redis_namespace
    proxy = TcpProxy("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    proxied = f"redis://127.0.0.1:{proxy.port}/0"
    log = ChangeLog()
    cut_off = RedisHub(
        HubSettings(url=proxied, prefix=prefix, catch_up_interval_seconds=0.2),
        log.read_changes,
        log.last_change_id,
        ping_every=0.1,
    )
    sender = redis_hub(url, prefix, log, catch_up_interval_seconds=QUIET)
    got = Received()
    try:
        async with running(cut_off), running(sender):
            await connected(cut_off, sender)
            with cut_off.subscribe(everything, 1000, nothing) as subscription:
                subscription.deliver_to(got)
                sender.publish(log.append(1))
                await eventually(lambda: cut_off.stats.received == 1)
                proxy.freeze()
                await eventually(lambda: not cut_off.stats.connected)
                sender.publish(log.append(2))
                await eventually(lambda: len(got.ids) >= 3)  # from the log meanwhile
                proxy.restore()
                await eventually(lambda: cut_off.stats.connected, within=60)
                sender.publish(log.append(2))
                await eventually(lambda: cut_off.stats.received >= 2)
                await eventually(lambda: len(got.ids) >= 5)
    finally:
        await proxy.stop()
    assert got.ids == [1, 2, 3, 4, 5]
    assert cut_off.stats.connects >= 2
