"""SSE fan-out: the relay against nginx + nchan, same subscribers, same publish rate.

1,000 subscribers (a Node.js client, bench/sse_subscribers.js, the same for both) hold
streams while 100 messages/s are published for 10 s: to the relay as signed ingests
(each makes one change), to nchan through its publisher endpoint. Prints the delivered
fraction and p50/p99 latency from publish to receipt for both, and the p99 ratio.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

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
    name: str, stream_url: str, publish: object, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    out = work / f"{name}.jsonl"
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
    sent, rate = asyncio.run(_publish_on_schedule(publish, args))  # type: ignore[arg-type]
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
    publish: Callable[[aiohttp.ClientSession, int], Awaitable[None]], args: argparse.Namespace
) -> tuple[dict[int, float], float]:
    """Send message n at start + n / rate, never waiting for earlier answers first."""
    sent: dict[int, float] = {}
    tasks = []
    async with aiohttp.ClientSession() as http:
        start = time.time()
        for n in range(args.rate * args.seconds):
            await asyncio.sleep(max(0.0, start + n / args.rate - time.time()))
            sent[n] = time.time() * 1000
            tasks.append(asyncio.create_task(publish(http, n)))
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
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        (work / "nginx.conf").write_text(NCHAN_CONF.format(work=work, port=port))
        nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)])
        try:
            wait_healthy(f"http://127.0.0.1:{port}")
            results["nginx + nchan"] = run(
                "nchan",
                f"http://127.0.0.1:{port}/sub",
                lambda http, n: publish_nchan(http, f"http://127.0.0.1:{port}", n),
                args,
                work,
            )
        finally:
            nginx.terminate()
            nginx.wait(timeout=30)

        port = free_port()
        config = relay_config(work, port, log_requests=True)
        extra = "[auth]\nenabled = false\n"
        if args.relay_buffer_bytes:
            extra += f"[sse]\nbuffer_bytes = {args.relay_buffer_bytes}\n"
        config.write_text(config.read_text() + extra)
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url)
            results["relay"] = run(
                "relay", f"{url}/v1/stream", lambda http, n: publish_relay(http, url, n), args, work
            )
        finally:
            relay.terminate()
            relay.wait(timeout=60)

    print(f"\n{args.subscribers} subscribers, {args.rate} messages/s for {args.seconds} s\n")
    print(f"{'server':<16} {'published/s':>11} {'delivered':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        figures = f"{r['rate']:>11.1f} {r['delivered']:>10.2%} {r['p50']:>8.1f} {r['p99']:>8.1f}"
        print(f"{name:<16} {figures}")
    ratio = results["relay"]["p99"] / results["nginx + nchan"]["p99"]
    print(f"\np99 ratio relay / nchan: {ratio:.2f} (target <= 1.0; delivered must be 100%)")


if __name__ == "__main__":
    main()
