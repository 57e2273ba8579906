"""Outbound webhooks: delivery throughput and change-to-receipt latency to a local sink.

`relay serve` runs as a subprocess with 100 subscriptions, all to a sink in this process
(an aiohttp server on loopback that checks one signature in 50 with the standardwebhooks
library). Two phases:

- throughput: changes are ingested first, then the 100 subscriptions are made, paused,
  and each `recover`s them, so a backlog of 100 deliveries per change waits; then all are
  enabled, and the rate is the deliveries received per second from the first to the last
  (filling the queue is timed apart);
- latency: changes are ingested at a steady 10/s (1,000 deliveries/s) and each delivery's
  time from the ingest's acknowledgement to its receipt is measured.

Targets: >= 3,000 signed deliveries/s; p99 <= 250 ms at 1,000 deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import standardwebhooks
from aiohttp import web

from bench.ingest import SECRET, free_port, wait_healthy
from relay.sign import sign_standard

SUBSCRIPTIONS = 100


def config_text(work: Path, port: int) -> str:
    return f"""
[server]
port = {port}
[store]
url = "sqlite:///{work}/webhooks.db"
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


def events_for(session: int) -> list[dict[str, object]]:
    """A session whose every event makes exactly one change."""
    chat = f"chat_bench_{session}"
    kinds = ["agent.chat.session.created", "agent.worker.ready"]
    kinds += ["agent.chat.turn.started", "agent.chat.turn.completed"] * 4
    return [
        {
            "id": f"evt_bench_{session}_{n}",
            "type": kind,
            "occurred_at": f"2026-11-20T09:00:{n:02d}.000Z",
            "data": {"chatId": chat, "turnId": f"turn_{session}_{(n - 2) // 2}"},
        }
        for n, kind in enumerate(kinds)
    ]


class Sink:
    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.received: list[tuple[float, str]] = []  # (arrival, cause event id)
        self.verified = 0
        self.failed_verification = 0
        self.expect = 0
        self.done = asyncio.Event()

    async def wait_for(self, count: int, seconds: float) -> None:
        self.expect = count
        self.done.clear()
        if len(self.received) < count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), seconds)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        payload = orjson.loads(body)
        cause = payload["data"].get("cause")
        if cause is None:  # an alert (a slow run outlives the ingested sessions' timeouts)
            return web.Response(status=204)
        self.received.append((now, cause["event_id"]))
        if len(self.received) >= self.expect:
            self.done.set()
        if len(self.received) % 50 == 0:
            try:
                standardwebhooks.Webhook(self.secrets[request.path]).verify(body, request.headers)
                self.verified += 1
            except standardwebhooks.webhooks.WebhookVerificationError:
                self.failed_verification += 1
        return web.Response(status=204)


async def ingest(http: aiohttp.ClientSession, url: str, event: dict[str, object]) -> float:
    body = orjson.dumps(event)
    ts = int(time.time())
    msg = f"msg_{event['id']}"
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SECRET, msg, ts, body),
    }
    async with http.post(f"{url}/v1/ingest/casedev", data=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
    return time.time()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct))]


async def run(args: argparse.Namespace, url: str) -> None:
    sink = Sink()
    app = web.Application()
    app.router.add_post("/s/{n}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sink_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", sink_port, backlog=2048).start()
    try:
        async with aiohttp.ClientSession() as http:
            # Throughput: a backlog of changes made before the subscriptions existed,
            # queued with `recover` while the subscriptions are paused (so that filling
            # the queue is not measured), then drained once they are all enabled.
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
            burst = [e for s in range(args.burst_sessions) for e in events_for(s)]
            acked: dict[str, float] = {}
            for event in burst:
                acked[str(event["id"])] = await ingest(http, url, event)
            subscription_ids = []
            for n in range(SUBSCRIPTIONS):
                path = f"/s/{n}"
                sub = {"url": f"http://127.0.0.1:{sink_port}{path}", "max_in_flight": 10}
                async with http.post(f"{url}/v1/subscriptions", json=sub) as resp:
                    assert resp.status == 201, await resp.text()
                    created = await resp.json()
                    sink.secrets[path] = created["secret"]
                    subscription_ids.append(created["id"])
                paused = {"enabled": False}
                async with http.patch(f"{url}/v1/subscriptions/{created['id']}", json=paused):
                    pass
            expected = len(burst) * SUBSCRIPTIONS
            filling = time.time()
            for sub_id in subscription_ids:
                recover = f"{url}/v1/subscriptions/{sub_id}/recover"
                async with http.post(recover, json={"since": since}) as resp:
                    assert resp.status == 202, await resp.text()
            started = time.time()
            for sub_id in subscription_ids:
                async with http.post(f"{url}/v1/subscriptions/{sub_id}/enable") as resp:
                    assert resp.status == 200, await resp.text()
            queued = time.time()
            await sink.wait_for(expected, 300)
            got = sink.received[:]
            first, last = got[0][0], got[-1][0]
            rate = len(got) / (last - first) if last > first else 0.0
            print(
                f"throughput: {len(burst)} changes x {SUBSCRIPTIONS} subscriptions ="
                f" {expected} deliveries queued (paused) in {started - filling:.2f} s,"
                f" enabled in {queued - started:.2f} s;"
                f" received {len(got)} in {last - started:.2f} s;"
                f" {rate:.0f} signed deliveries/s from first to last receipt"
            )

            # Latency at a steady rate.
            sink.received.clear()
            steady = [e for s in range(1000, 1000 + args.steady_sessions) for e in events_for(s)]
            steady = steady[: int(args.changes_per_second * args.seconds)]
            interval = 1.0 / args.changes_per_second
            began = time.monotonic()
            for i, event in enumerate(steady):
                delay = began + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                acked[str(event["id"])] = await ingest(http, url, event)
            await sink.wait_for(len(steady) * SUBSCRIPTIONS, 120)
            latencies = [(at - acked[cause]) * 1000 for at, cause in sink.received]
            span = time.monotonic() - began
            print(
                f"latency at {args.changes_per_second * SUBSCRIPTIONS:.0f} deliveries/s"
                f" ({len(steady)} changes over {span:.1f} s, {len(latencies)} deliveries):"
                f" p50 {percentile(latencies, 0.50):.1f} ms,"
                f" p99 {percentile(latencies, 0.99):.1f} ms,"
                f" max {max(latencies):.1f} ms"
            )
            print(
                f"signatures checked with standardwebhooks: {sink.verified} verified,"
                f" {sink.failed_verification} failed"
            )
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst-sessions", type=int, default=30, help="10 changes each")
    parser.add_argument("--steady-sessions", type=int, default=20)
    parser.add_argument("--changes-per-second", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        port = free_port()
        config = Path(tmp) / "relay.toml"
        config.write_text(config_text(Path(tmp), port))
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
            try:
                import uvloop
            except ImportError:
                asyncio.run(run(args, url))
            else:
                uvloop.run(run(args, url))
        finally:
            relay.terminate()
            relay.wait(timeout=30)


if __name__ == "__main__":
    main()
