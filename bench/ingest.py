"""Ingest throughput and latency: the relay against a bare aiohttp handler, in one run.

Both servers get the same pre-signed, unique requests from wrk (64 connections by
default). Prints requests/s, p50/p99 latency and the ratio relay / bare. Needs `wrk`
(Debian package). Run it on an otherwise idle machine: `make bench-ingest`.
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench import forward
from relay.sign import sign_standard
from relay.webhooks.secrets import new_webhook_secret

HERE = Path(__file__).resolve().parent
# A secret made per run (worker processes inherit it through the environment).
SECRET = os.environ.setdefault("RELAY_BENCH_SECRET", new_webhook_secret())


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


ACTIVE_SESSIONS = 1000  # sessions with events in flight at any one time
TURNS_PER_SESSION = 20
SETUP = (
    "agent.chat.session.created",
    "agent.runtime.reused",
    "agent.scope.activated",
    "agent.worker.ready",
)
SCRIPT_LENGTH = len(SETUP) + 2 * TURNS_PER_SESSION


def lifecycle_bodies(count: int) -> list[bytes]:
    """`count` unique events of realistic session lifecycles, interleaved.

    ACTIVE_SESSIONS sessions run side by side; each goes through setup (created, runtime
    reused, scope activated, worker ready) and then TURNS_PER_SESSION turns (started, then
    completed, or failed one time in ten) before a new session takes its place.
    """
    bodies = []
    for n in range(count):
        slot, step = n % ACTIVE_SESSIONS, n // ACTIVE_SESSIONS
        generation, position = divmod(step, SCRIPT_LENGTH)
        session = f"chat_{generation:04d}_{slot:04d}"
        data: dict[str, object] = {"chatId": session, "sandboxId": f"sbx_{slot:04d}"}
        if position < len(SETUP):
            event_type = SETUP[position]
        else:
            turn, ends = divmod(position - len(SETUP), 2)
            data["turnId"] = f"turn_{turn:03d}"
            if not ends:
                event_type = "agent.chat.turn.started"
            elif (generation + slot + turn) % 10 == 0:
                event_type = "agent.chat.turn.failed"
                data["error"] = {"message": "tool call timed out", "code": "TOOL_TIMEOUT"}
            else:
                event_type = "agent.chat.turn.completed"
                data["usage"] = {"inputTokens": 5120, "outputTokens": 812, "costMicros": 27600}
        seconds = 9 * 3600 + position * 7
        occurred = (
            f"2026-11-20T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.000Z"
        )
        bodies.append(
            orjson.dumps(
                {
                    "id": f"evt_bench_{n:08d}",
                    "type": event_type,
                    "occurred_at": occurred,
                    "data": data,
                }
            )
        )
    return bodies


def write_requests(path: Path, count: int) -> None:
    """One line per request: webhook-id, timestamp, signature, body (tab-separated)."""
    now = int(time.time())
    with path.open("w") as out:
        for n, body in enumerate(lifecycle_bodies(count)):
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


class Server:
    """A server under test, started once and measured in several rounds."""

    def __init__(self, name: str, command: list[str], port: int, cwd: Path, db: Path | None):
        self.name, self.port, self.db = name, port, db
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.rounds: list[Result] = []

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def median(self) -> Result:
        def mid(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        return Result(
            self.name,
            mid([r.rps for r in self.rounds]),
            mid([r.p50_ms for r in self.rounds]),
            mid([r.p99_ms for r in self.rounds]),
            sum(r.non_2xx for r in self.rounds),
            sum(r.requests for r in self.rounds),
        )


def relay_config(work: Path, port: int, log_requests: bool, writer: str = "process") -> Path:
    config = work / f"relay-{port}.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
url = "sqlite:///{work}/bench-{port}.db"
writer = "{writer}"
[log]
format = "json"
requests = {str(log_requests).lower()}
[[sources]]
id = "casedev"
provider = "casedev"
secrets = ["{SECRET}"]
tolerance_seconds = 3600
{forward.SOURCE_TOML}"""
    )
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per server")
    parser.add_argument("--duration", type=int, default=5, help="seconds per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-round", type=int, default=40_000, help="unique requests per round")
    parser.add_argument(
        "--no-request-log",
        action="store_true",
        help="also run a relay without per-request log lines",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also run the relay with its store write taken out (bench/ceiling_server.py)",
    )
    parser.add_argument(
        "--thread-writer",
        action="store_true",
        help="also run a relay with store.writer = thread (no writer process)",
    )
    parser.add_argument(
        "--forward",
        action="store_true",
        help="also forward 200-frame SSE streams to the relay (bench/forward.py)",
    )
    parser.add_argument("--smoke", action="store_true", help="one short round, to try it out")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.per_round = 1, 1, 1, 2000

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        requests_file = work / "requests.tsv"
        total = args.per_round * (args.rounds + 1)
        print(f"signing {total} unique requests ...", flush=True)
        write_requests(requests_file, total)

        port = free_port()
        bare = [sys.executable, str(HERE / "bare_server.py"), str(port)]
        servers = [Server("bare aiohttp", bare, port, work, None)]
        variants = [("relay", True, "process")]
        if args.no_request_log:
            variants.append(("relay (no request log)", False, "process"))
        if args.thread_writer:
            variants.append(("relay (thread writer)", True, "thread"))
        for name, log_requests, writer in variants:
            port = free_port()
            config = relay_config(work, port, log_requests, writer)
            command = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
            servers.append(Server(name, command, port, work, work / f"bench-{port}.db"))
        if args.ceiling:
            port = free_port()
            config = relay_config(work, port, True)
            command = [sys.executable, "-m", "bench.ceiling_server", "--config", str(config)]
            servers.append(Server("relay, nothing stored", command, port, HERE.parent, None))
        try:
            for server in servers:
                wait_healthy(server.url)
                run_wrk(server.url, requests_file, 0, args.warmup, args)
            for round_number in range(1, args.rounds + 1):
                start = args.per_round * round_number
                for server in servers:
                    server.rounds.append(
                        run_wrk(server.url, requests_file, start, args.duration, args)
                    )
                figures = "  ".join(f"{s.name}: {s.rounds[-1].rps:.0f}/s" for s in servers)
                print(f"round {round_number}: {figures}", flush=True)
            streamed = None
            if args.forward:
                streams = forward.signed_requests(200 if args.smoke else 5000)
                seconds = args.duration * args.rounds
                streamed = asyncio.run(
                    forward.measure(servers[1].url, streams, seconds, args.connections // 4 or 1)
                )
        finally:
            for server in servers:
                server.stop()
        stored = {
            s.name: sqlite3.connect(s.db).execute("SELECT count(*) FROM events").fetchone()[0]
            for s in servers
            if s.db is not None
        }

    results = [s.median() for s in servers]
    base = results[0]
    print(
        f"\nwrk -t{args.threads} -c{args.connections}, {args.rounds} alternating rounds of"
        f" {args.duration} s, unique signed events; medians\n"
    )
    print(f"{'server':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6}")
    for r in results:
        figures = f"{r.rps:>8.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.non_2xx:>8}"
        print(f"{r.name:<26} {figures} {r.rps / base.rps:>6.2f}")
    for name, count in stored.items():
        print(f"{name}: {count} events stored")
    if streamed is not None:
        print(f"\n{streamed.row()}  (relay, {args.connections // 4 or 1} connections)")
    relay = results[1]
    ok = relay.rps / base.rps >= 0.6 and relay.p99_ms <= 25
    print(f"\ntarget ratio >= 0.60 and p99 <= 25 ms: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
