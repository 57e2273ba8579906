"""Ingest throughput and latency: the relay against a bare aiohttp handler, in one run.

Both servers get the same pre-signed, unique requests from wrk (64 connections by
default). Prints requests/s, p50/p99 latency and the ratio relay / bare. Needs `wrk`
(Debian package). Run it on an otherwise idle machine: `make bench-ingest`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

from relay.sign import sign_standard

HERE = Path(__file__).resolve().parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EVENT_TYPES = [
    "agent.chat.turn.started",
    "agent.chat.turn.completed",
    "agent.worker.ready",
    "agent.runtime.reused",
]


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_requests(path: Path, count: int) -> None:
    """One line per request: webhook-id, timestamp, signature, body (tab-separated)."""
    now = int(time.time())
    with path.open("w") as out:
        for n in range(count):
            body = orjson.dumps(
                {
                    "id": f"evt_bench_{n:08d}",
                    "type": EVENT_TYPES[n % len(EVENT_TYPES)],
                    "occurred_at": "2026-11-20T09:00:00.000Z",
                    "data": {
                        "chatId": f"chat_{n % 997:04d}",
                        "turnId": f"turn_{n // 997:05d}",
                        "usage": {"inputTokens": 5120, "outputTokens": 812, "costMicros": 27600},
                    },
                }
            )
            msg_id = f"msg_{n:08d}"
            signature = sign_standard(SECRET, msg_id, now, body)
            out.write(f"{msg_id}\t{now}\t{signature}\t{body.decode()}\n")


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


def run_wrk(
    url: str, requests_file: Path, start: int, seconds: float, args: argparse.Namespace
) -> Result:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(HERE / "requests.lua"),
        url + "/v1/ingest/casedev",
        "--",
        str(requests_file),
        str(start),
        str(args.threads),
        "/v1/ingest/casedev",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_wrk("", out)


def parse_wrk(name: str, out: str) -> Result:
    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            raise ValueError(f"no {pct}% latency in wrk output:\n{out}")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Result(
        name, rps, latency("50"), latency("99"), int(non_2xx.group(1)) if non_2xx else 0, total
    )


def measure(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    requests_file: Path,
    args: argparse.Namespace,
    cwd: Path,
) -> Result:
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        run_wrk(url, requests_file, 0, args.warmup, args)
        result = run_wrk(url, requests_file, args.warmup_requests, args.duration, args)
        result.name = name
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def relay_config(work: Path, port: int, log_requests: bool) -> Path:
    config = work / f"relay-{port}.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
url = "sqlite:///{work}/bench-{port}.db"
[log]
format = "json"
requests = {str(log_requests).lower()}
[[sources]]
id = "casedev"
provider = "casedev"
secrets = ["{SECRET}"]
tolerance_seconds = 3600
"""
    )
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--warmup-requests", type=int, default=60_000)
    parser.add_argument(
        "--no-request-log", action="store_true", help="also run the relay without per-request logs"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        requests_file = work / "requests.tsv"
        print(f"signing {args.requests} unique requests ...", flush=True)
        write_requests(requests_file, args.requests)
        env = {**os.environ}
        results = []

        port = free_port()
        bare = [sys.executable, str(HERE / "bare_server.py"), str(port)]
        results.append(measure("bare aiohttp", bare, env, port, requests_file, args, work))

        variants = [("relay", True)] + (
            [("relay (no request log)", False)] if args.no_request_log else []
        )
        for name, log_requests in variants:
            port = free_port()
            config = relay_config(work, port, log_requests)
            relay = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
            result = measure(name, relay, env, port, requests_file, args, work)
            stored = (
                sqlite3.connect(work / f"bench-{port}.db")
                .execute("SELECT count(*) FROM events")
                .fetchone()[0]
            )
            result.name += f" [{stored} stored]"
            results.append(result)

    base = results[0]
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, unique signed events\n")
    print(f"{'server':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6}")
    for r in results:
        figures = f"{r.rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.non_2xx:>8}"
        print(f"{r.name:<40} {figures} {r.rps / base.rps:>6.2f}")
    relay_result = results[1]
    ok = relay_result.rps / base.rps >= 0.6 and relay_result.p99_ms <= 25
    print(f"\ntarget ratio >= 0.60 and p99 <= 25 ms: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
