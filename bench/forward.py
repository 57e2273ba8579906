"""Forwarded streams: requests of 200 SSE frames each, signed over the whole body.

Measures requests/s, frames/s and the p50 / p99 latency per request against a running
relay whose source `stream` has provider `scriberr`. Used by `bench.ingest` (the
forwarded-stream row) and on its own: `python -m bench.forward --smoke` starts a relay,
sends a few streams for a second and prints the row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from relay.sign import sign_standard
from relay.webhooks.secrets import new_webhook_secret

# A secret made per run (worker processes inherit it through the environment).
SECRET = os.environ.setdefault("RELAY_BENCH_SECRET", new_webhook_secret())
SOURCE = "stream"
FRAMES = 200
SOURCE_TOML = f"""
[[sources]]
id = "{SOURCE}"
provider = "scriberr"
secrets = ["{SECRET}"]
tolerance_seconds = 3600
"""


@dataclass
class ForwardResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    frames: int = FRAMES

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        return (
            f"{'forwarded stream (200 frames)':<30} {self.rps:>8.0f} req/s"
            f" {self.rps * self.frames:>9.0f} frames/s  p50 {self.p50_ms:.2f} ms"
            f"  p99 {self.p99_ms:.2f} ms  non-2xx {self.non_2xx}"
        )


def stream_body(n: int, frames: int = FRAMES) -> bytes:
    """One Scriberr run as SSE: started, a message, deltas, completed with usage."""
    ids = {"session_id": f"chat_fwd_{n % 1000:04d}", "run_id": f"run_{n:08d}", "message_id": "m"}
    parts = [(b"chat.run.started", ids), (b"chat.message.created", ids)]
    for i in range(frames - 3):
        kind = b"chat.delta.reasoning" if i % 5 == 0 else b"chat.delta.content"
        parts.append((kind, {**ids, "delta": f"token {i} "}))
    usage = {"prompt_tokens": 1200, "completion_tokens": 240, "total_tokens": 1440}
    parts.append((b"chat.run.completed", {**ids, "status": "completed", "usage": usage}))
    return b"".join(b"event: " + k + b"\ndata: " + orjson.dumps(d) + b"\n\n" for k, d in parts)


def signed_requests(count: int, offset: int = 0) -> list[tuple[dict[str, str], bytes]]:
    now = int(time.time())
    out = []
    for n in range(offset, offset + count):
        body, msg_id = stream_body(n), f"fwd_{n:08d}"
        headers = {
            "Content-Type": "text/event-stream",
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign_standard(SECRET, msg_id, now, body),
        }
        out.append((headers, body))
    return out


async def measure(
    url: str, requests: list[tuple[dict[str, str], bytes]], seconds: float, connections: int
) -> ForwardResult:
    """Post the requests from `connections` workers until `seconds` pass or they run out."""
    latencies: list[float] = []
    failures = 0
    queue = iter(requests)
    deadline = time.perf_counter() + seconds
    target = f"{url}/v1/ingest/{SOURCE}"

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        for headers, body in queue:
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            async with http.post(target, data=body, headers=headers) as resp:
                await resp.read()
                failures += resp.status >= 300
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(connections)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000

    return ForwardResult(len(latencies), elapsed, pct(0.5), pct(0.99), failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5000, help="unique streams signed")
    parser.add_argument("--smoke", action="store_true", help="a second, 2 connections")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.connections, args.requests = 1.0, 2, 50
    from bench.ingest import free_port, wait_healthy

    with tempfile.TemporaryDirectory(prefix="relay-bench-forward-") as tmp:
        port = free_port()
        config = Path(tmp) / "relay.toml"
        config.write_text(
            f'[server]\nport = {port}\n[store]\nurl = "sqlite:///{tmp}/bench.db"\n'
            f"[log]\nrequests = false\n{SOURCE_TOML}"
        )
        command = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url)
            requests = signed_requests(args.requests)
            result = asyncio.run(measure(url, requests, args.duration, args.connections))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(result.row())


if __name__ == "__main__":
    main()
