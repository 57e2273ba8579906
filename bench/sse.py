"""SSE fan-out: the relay against nginx + nchan, same subscribers, same publish rate.

1,000 subscribers (a Node.js client, bench/sse_subscribers.js, the same for both) hold
streams while 100 messages/s are published for 10 s: to the relay as signed ingests
(each makes one change), to nchan through its publisher endpoint. Prints the delivered
fraction and p50/p99 latency from publish to receipt for both, and the p99 ratio. Both
servers run side by side and are measured in alternating rounds (medians), because a
shared machine's noise moves one round's figures by more than the difference measured.
Needs nginx with Debian's libnginx-mod-nchan, and node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.ingest import HERE, SECRET, free_port, relay_config, wait_healthy
from relay.sign import sign_standard

NCHAN_CONF = """
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 "ok"; }}
    location = /pub {{ nchan_publisher; nchan_channel_id bench; }}
    location = /sub {{ nchan_subscriber eventsource; nchan_channel_id bench; }}
  }}
}}
"""


async def publish_relay(http: aiohttp.ClientSession, url: str, n: int) -> None:
    body = orjson.dumps(
        {
            "id": f"evt_b_{n}",
            "type": "agent.chat.session.created",
            "occurred_at": "2026-11-20T09:00:00.000Z",
            "data": {"chatId": f"chat_{n}"},
        }
    )
    ts = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": f"msg_{n}",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SECRET, f"msg_{n}", ts, body),
    }
    async with http.post(f"{url}/v1/ingest/casedev", data=body, headers=headers) as resp:
        await resp.read()


# nchan gets messages as large as the relay's change frames (a change carries the whole
# session snapshot), so both servers and the client move the same number of bytes.
NCHAN_PADDING = "x" * 1100


async def publish_nchan(http: aiohttp.ClientSession, url: str, n: int) -> None:
    body = orjson.dumps({"n": n, "pad": NCHAN_PADDING})
    async with http.post(f"{url}/pub", data=body) as resp:
        await resp.read()


def run(
    name: str, stream_url: str, publish: object, args: argparse.Namespace, work: Path, offset: int
) -> dict[str, float]:
    out = work / f"{name}-{offset}.jsonl"
    seconds = args.seconds + 8
    client = subprocess.Popen(
        [
            "node",
            str(HERE / "sse_subscribers.js"),
            stream_url,
            str(args.subscribers),
            str(out),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    client.stdout.readline()  # "connected"
    time.sleep(1)
    sent, rate = asyncio.run(_publish_on_schedule(publish, args, offset))  # type: ignore[arg-type]
    time.sleep(3)  # let the last messages arrive
    client.terminate()
    client.wait(timeout=60)
    latencies = []
    delivered = 0
    for line in out.read_text().splitlines():
        arrivals = json.loads(line)
        for key, at in arrivals.items():
            n = int(key)
            if n in sent:
                delivered += 1
                latencies.append(at - sent[n])
    latencies.sort()
    expected = len(sent) * args.subscribers

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * q))] if latencies else 0.0

    return {
        "delivered": delivered / expected,
        "p50": pick(0.5),
        "p99": pick(0.99),
        "rate": rate,
    }


async def _publish_on_schedule(
    publish: Callable[[aiohttp.ClientSession, int], Coroutine[Any, Any, None]],
    args: argparse.Namespace,
    offset: int,
) -> tuple[dict[int, float], float]:
    """Send message n at start + n / rate, never waiting for earlier answers first."""
    sent: dict[int, float] = {}
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as http:
        start = time.time()
        for i in range(args.rate * args.seconds):
            await asyncio.sleep(max(0.0, start + i / args.rate - time.time()))
            sent[offset + i] = time.time() * 1000
            tasks.append(asyncio.create_task(publish(http, offset + i)))
        rate = len(sent) / (time.time() - start)
        await asyncio.gather(*tasks)
    return sent, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=100, help="messages per second")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--relay-buffer-bytes", type=int, default=None, help="sse.buffer_bytes for the relay"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"nginx + nchan": [], "relay": []}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        nchan_port, relay_port = free_port(), free_port()
        nchan_url, relay_url = f"http://127.0.0.1:{nchan_port}", f"http://127.0.0.1:{relay_port}"
        (work / "nginx.conf").write_text(NCHAN_CONF.format(work=work, port=nchan_port))
        config = relay_config(work, relay_port, log_requests=True)
        extra = "[auth]\nenabled = false\n"
        if args.relay_buffer_bytes:
            extra += f"[sse]\nbuffer_bytes = {args.relay_buffer_bytes}\n"
        config.write_text(config.read_text() + extra)
        servers = [
            subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)]),
            subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            wait_healthy(nchan_url)
            wait_healthy(relay_url)
            for number in range(args.rounds):
                offset = number * 1_000_000
                rounds["nginx + nchan"].append(
                    run(
                        "nchan",
                        f"{nchan_url}/sub",
                        lambda http, n: publish_nchan(http, nchan_url, n),
                        args,
                        work,
                        offset,
                    )
                )
                rounds["relay"].append(
                    run(
                        "relay",
                        f"{relay_url}/v1/stream",
                        lambda http, n: publish_relay(http, relay_url, n),
                        args,
                        work,
                        offset,
                    )
                )
                figures = "  ".join(
                    f"{name}: p50 {r[-1]['p50']:.0f} ms p99 {r[-1]['p99']:.0f} ms"
                    f" delivered {r[-1]['delivered']:.2%}"
                    for name, r in rounds.items()
                )
                print(f"round {number + 1}: {figures}", flush=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=60)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    results = {
        name: {
            "rate": median([r["rate"] for r in runs]),
            "delivered": min(r["delivered"] for r in runs),
            "p50": median([r["p50"] for r in runs]),
            "p99": median([r["p99"] for r in runs]),
        }
        for name, runs in rounds.items()
    }
    print(
        f"\n{args.subscribers} subscribers, {args.rate} messages/s for {args.seconds} s,"
        f" {args.rounds} alternating rounds; medians (delivered: the lowest round)\n"
    )
    print(f"{'server':<16} {'published/s':>11} {'delivered':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        figures = f"{r['rate']:>11.1f} {r['delivered']:>10.2%} {r['p50']:>8.1f} {r['p99']:>8.1f}"
        print(f"{name:<16} {figures}")
    ratio = results["relay"]["p99"] / results["nginx + nchan"]["p99"]
    print(f"\np99 ratio relay / nchan: {ratio:.2f} (target <= 1.0; delivered must be 100%)")


if __name__ == "__main__":
    main()
