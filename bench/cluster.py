"""Cluster mode against the embedded store, in one run.

- ingest: events/s and p50/p99 latency for one relay on embedded SQLite, one relay on
  PostgreSQL (with the Redis hub) and two relays on one PostgreSQL database (the load
  split evenly over both), each given the same pre-signed, unique lifecycle events by
  the same client (worker processes with aiohttp keep-alive connections); all three are
  up at once and take turns, round by round (5 rounds of 10 s); each setup's median
  round is shown, and each ratio is the median of the rounds' ratios (a round's three
  setups run under about the same conditions, while the machine's speed drifts);
- SSE across instances: changes ingested on one instance at a steady 100/s, received on
  a stream of the other; latency from sending the ingest request to receipt, p50/p99;
- deliveries/s with two instances: a backlog of changes queued for paused
  subscriptions (`recover`), then drained by both instances once the subscriptions are
  enabled; the rate from the first receipt to the last.

Targets: one PostgreSQL instance >= 0.7 of SQLite; two instances no slower than one;
cross-instance SSE p99 <= 50 ms. Needs PostgreSQL and Redis on 127.0.0.1 (each run
makes its own databases and drops them). Run it on an otherwise idle machine:
`make bench-cluster`; `--smoke` for a short try.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from bench.ingest import SECRET, free_port, wait_healthy, write_requests
from bench.webhooks import Sink, events_for, ingest, percentile

PG_ADMIN = os.environ.get("RELAY_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("RELAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Round:
    ok: int
    failed: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


@dataclass
class Setup:
    name: str
    instances: int
    backend: str  # "sqlite" | "postgresql"
    rounds: list[Round] = field(default_factory=list)

    def median(self) -> Round:
        return sorted(self.rounds, key=lambda r: r.rps)[len(self.rounds) // 2]


# -- the load: worker processes posting pre-signed requests -------------------------------


def load_worker(job: tuple[list[str], str, int, int, int, float]) -> Round:
    urls, requests_file, start, count, connections, seconds = job
    with open(requests_file) as lines:
        chosen = [line.rstrip("\n").split("\t") for n, line in enumerate(lines) if n >= start]
    return asyncio.run(_load(urls, chosen[:count], connections, seconds))


async def _load(
    urls: list[str], chosen: list[list[str]], connections: int, seconds: float
) -> Round:
    requests = iter(chosen)
    latencies: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds

    async def connection(http: aiohttp.ClientSession, url: str) -> None:
        nonlocal failed
        target = url + "/v1/ingest/casedev"
        for msg_id, stamp, signature, body in requests:
            if time.monotonic() > deadline:
                return
            headers = {
                "Content-Type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": stamp,
                "webhook-signature": signature,
            }
            sent = time.perf_counter()
            try:
                async with http.post(target, data=body.encode(), headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 202
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - sent) * 1000)
            else:
                failed += 1

    began = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(connection(http, urls[i % len(urls)]) for i in range(connections)))
    return Round(len(latencies), failed, time.monotonic() - began, latencies)


def run_round(
    pool: ProcessPoolExecutor,
    urls: list[str],
    requests_file: Path,
    start: int,
    count: int,
    args: argparse.Namespace,
    seconds: float,
) -> Round:
    workers = args.workers
    share = count // workers
    jobs = [
        (urls, str(requests_file), start + n * share, share, args.connections // workers, seconds)
        for n in range(workers)
    ]
    parts = list(pool.map(load_worker, jobs))
    return Round(
        sum(p.ok for p in parts),
        sum(p.failed for p in parts),
        max(p.seconds for p in parts),
        [latency for p in parts for latency in p.latencies_ms],
    )


# -- the relays ------------------------------------------------------------------------------


def config_text(store_url: str, hub_url: str, prefix: str) -> str:
    return f"""
[store]
url = "{store_url}"
[hub]
url = "{hub_url}"
prefix = "{prefix}"
[auth]
enabled = false
[log]
requests = false
level = "warning"
[delivery]
allow_private_networks = true
timeout_seconds = 10
[[sources]]
id = "casedev"
provider = "casedev"
secrets = ["{SECRET}"]
tolerance_seconds = 3600
"""


@asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A new PostgreSQL database, dropped afterwards."""
    name = f"relay_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{PG_ADMIN.rpartition('/')[0]}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextmanager
def relays(work: Path, store_url: str, hub_url: str, count: int) -> Iterator[list[str]]:
    """`count` relay processes on one store; their URLs."""
    config = work / f"relay-{uuid.uuid4().hex[:8]}.toml"
    config.write_text(config_text(store_url, hub_url, f"bench-{uuid.uuid4().hex[:8]}"))
    relay = [sys.executable, "-m", "relay"]
    subprocess.run([*relay, "migrate", "--config", str(config)], check=True, cwd=work)
    procs, urls = [], []
    try:
        for _ in range(count):
            port = free_port()
            env = {**os.environ, "RELAY_SERVER__PORT": str(port)}
            procs.append(
                subprocess.Popen(
                    [*relay, "serve", "--config", str(config)],
                    cwd=work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_healthy(url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


# -- SSE across instances, deliveries with two ----------------------------------------------


async def sse_latency(source: str, stream: str, rate: float, seconds: float) -> list[float]:
    """Changes ingested on `source` at `rate`/s, received on `stream`: ms from sending."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    total = int(rate * seconds)
    run = uuid.uuid4().hex[:8]
    done = asyncio.Event()

    async def follow(resp: aiohttp.ClientResponse) -> None:
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            change = orjson.loads(line[6:])
            at = sent.get(change.get("session_id", ""))
            if at is not None and change.get("type") == "session.created":
                latencies.append((time.perf_counter() - at) * 1000)
                if len(latencies) >= total:
                    done.set()
                    return

    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(stream + "/v1/stream") as resp,
    ):
        follower = asyncio.create_task(follow(resp))
        posts: list[asyncio.Task[float]] = []
        began = time.monotonic()
        for n in range(total):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chat = f"chat_sse_{run}_{n}"
            event = {
                "id": f"evt_sse_{run}_{n}",
                "type": "agent.chat.session.created",
                "occurred_at": "2026-11-20T09:00:00.000Z",
                "data": {"chatId": chat},
            }
            sent[chat] = time.perf_counter()
            posts.append(asyncio.create_task(ingest(http, source, event)))
        try:
            await asyncio.wait_for(done.wait(), 30)
        except TimeoutError:
            print(f"  sse: only {len(latencies)} of {total} changes arrived", flush=True)
        follower.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
    return latencies


async def delivery_rate(urls: list[str], sessions: int, subscriptions: int) -> tuple[int, float]:
    """Deliveries made by the instances together: (received, per second)."""
    sink = Sink()
    app = web.Application()
    app.router.add_post("/s/{n}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sink_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", sink_port, backlog=2048).start()
    try:
        async with aiohttp.ClientSession() as http:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
            run = 100_000 + int(time.time()) % 100_000 * 10
            burst = [e for s in range(run, run + sessions) for e in events_for(s)]
            for n, event in enumerate(burst):
                await ingest(http, urls[n % len(urls)], event)
            ids = []
            for n in range(subscriptions):
                sub = {"url": f"http://127.0.0.1:{sink_port}/s/{n}", "max_in_flight": 10}
                async with http.post(f"{urls[0]}/v1/subscriptions", json=sub) as resp:
                    created = await resp.json()
                sink.secrets[f"/s/{n}"] = created["secret"]
                ids.append(created["id"])
                patch = f"{urls[0]}/v1/subscriptions/{created['id']}"
                async with http.patch(patch, json={"enabled": False}):
                    pass
            for sub_id in ids:
                recover = f"{urls[0]}/v1/subscriptions/{sub_id}/recover"
                async with http.post(recover, json={"since": since}) as resp:
                    assert resp.status == 202, await resp.text()
            for sub_id in ids:
                async with http.post(f"{urls[0]}/v1/subscriptions/{sub_id}/enable") as resp:
                    assert resp.status == 200, await resp.text()
            expected = len(burst) * subscriptions
            await sink.wait_for(expected, 300)
            got = sink.received[:]
            first, last = got[0][0], got[-1][0]
            return len(got), (len(got) / (last - first) if last > first else 0.0)
    finally:
        await runner.cleanup()


# -- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> None:
    requests_file = work / "requests.tsv"
    per_round = args.per_round
    setups = [
        Setup("embedded SQLite, 1 instance", 1, "sqlite"),
        Setup("PostgreSQL, 1 instance", 1, "postgresql"),
        Setup("PostgreSQL, 2 instances", 2, "postgresql"),
    ]
    total = per_round * (args.rounds + 1)
    print(f"signing {total} unique requests ...", flush=True)
    write_requests(requests_file, total)
    sse: list[float] = []
    deliveries = (0, 0.0)
    # Every setup is up at once and their rounds alternate, so a slow moment of the
    # machine falls on all of them alike instead of on one.
    up = [AsyncExitStack() for _ in setups]  # each setup's store and relays
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            urls_of = [
                await _start(setup, work, stack) for setup, stack in zip(setups, up, strict=True)
            ]
            for urls in urls_of:
                run_round(pool, urls, requests_file, 0, per_round, args, args.warmup)
            for n in range(args.rounds):
                for setup, urls in zip(setups, urls_of, strict=True):
                    start = per_round * (n + 1)
                    result = run_round(
                        pool, urls, requests_file, start, per_round, args, args.duration
                    )
                    setup.rounds.append(result)
                    print(
                        f"  {setup.name}, round {n + 1}: {result.rps:.0f} events/s"
                        f" ({result.failed} failed)",
                        flush=True,
                    )
        for stack in up[:-1]:  # only the two instances stay up for SSE and deliveries
            await stack.aclose()
        two = urls_of[-1]
        sse = await sse_latency(two[0], two[1], 100, args.sse_seconds)
        deliveries = await delivery_rate(two, args.delivery_sessions, args.subscriptions)
    finally:
        for stack in reversed(up):
            await stack.aclose()
    report(setups, sse, deliveries)


async def _start(setup: Setup, work: Path, stack: AsyncExitStack) -> list[str]:
    """The setup's store and relays, kept up until `stack` closes; the relays' URLs."""
    store_url, hub_url = await stack.enter_async_context(_store(setup, work))
    return stack.enter_context(relays(work, store_url, hub_url, setup.instances))


@asynccontextmanager
async def _store(setup: Setup, work: Path) -> AsyncIterator[tuple[str, str]]:
    if setup.backend == "sqlite":
        yield f"sqlite:///{work}/bench-{uuid.uuid4().hex[:8]}.db", "memory://"
        return
    async with database() as url:
        yield url, REDIS


def report(setups: list[Setup], sse: list[float], deliveries: tuple[int, float]) -> None:
    print("\ningest (median round)          events/s    p50 ms    p99 ms   failed")
    for setup in setups:
        best = setup.median()
        print(
            f"  {setup.name:<30}{best.rps:>8.0f}{percentile(best.latencies_ms, 0.5):>10.1f}"
            f"{percentile(best.latencies_ms, 0.99):>10.1f}{best.failed:>9}"
        )
    sqlite, one, two = setups
    medians = [one.median().rps / sqlite.median().rps, two.median().rps / one.median().rps]
    print(f"\nthe medians' ratios: {medians[0]:.2f} and {medians[1]:.2f}")
    # The setups take turns round by round, so a round's three ran under about the same
    # conditions; its ratios are compared, and their median counts (the machine's speed
    # drifts over a run, and the medians of the setups can come from different rounds).
    print("per round, and their median (the figure that counts):")
    for name, (a, b), target in (
        ("PostgreSQL 1 instance / SQLite", (one, sqlite), "0.7"),
        ("PostgreSQL 2 instances / 1", (two, one), "1.0"),
    ):
        ratios = [x.rps / y.rps for x, y in zip(a.rounds, b.rounds, strict=True) if y.rps]
        listed = " ".join(f"{r:.2f}" for r in ratios)
        print(f"  {name:<32}{statistics.median(ratios):.2f}  (target >= {target}; rounds {listed})")
    if sse:
        p50, p99 = percentile(sse, 0.5), percentile(sse, 0.99)
        print(
            f"SSE across instances at 100 changes/s ({len(sse)} changes): p50 {p50:.1f} ms,"
            f" p99 {p99:.1f} ms  (target p99 <= 50 ms)"
        )
    received, rate = deliveries
    print(f"deliveries with 2 instances: {received} received, {rate:.0f}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per setup")
    parser.add_argument("--duration", type=float, default=10, help="seconds per round")
    parser.add_argument("--warmup", type=float, default=2, help="seconds before the rounds")
    parser.add_argument("--connections", type=int, default=64, help="in all")
    parser.add_argument("--workers", type=int, default=2, help="load processes")
    parser.add_argument("--per-round", type=int, default=60_000, help="events per round")
    parser.add_argument("--sse-seconds", type=float, default=30)
    parser.add_argument("--delivery-sessions", type=int, default=100, help="10 changes each")
    parser.add_argument("--subscriptions", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="one short round, to try it out")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.per_round = 1, 2, 0.5, 8000
        args.sse_seconds, args.delivery_sessions, args.subscriptions = 3, 10, 10
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
