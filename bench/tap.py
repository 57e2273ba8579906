"""The tap's cost: the same SSE streams read directly from an upstream and through
`/v1/tap/{source}/{path}`, in one run.

A fake Case.dev upstream (a process of its own) answers each `/respond` with a turn of
`--frames` frames, written as fast as the connection takes them, each stamped with the
time it was written. `--streams` clients read them at once, directly, through a bare
pass-through, then through a `relay serve` whose source taps that upstream (after one
tapped stream that starts the store's writer, and once the relay is idle), in
`--rounds` alternating rounds (5: a run of well under a second is otherwise decided by
a slow moment of the machine; the round of median rate counts). Prints frames/s each
way, the ratio
tap / direct (target at least 0.8) and the latency per frame (written to read) at p50
and p99 each way, with what the tap adds (target p99 at most 5 ms), and the CPU time
per frame each process used each way: the upstream and the readers (this process)
directly; the upstream, the relay, its store's writer (storing included) and the readers
through the tap. Where the processes saturate the machine together, the throughput
ratio is about direct CPU / tap CPU per frame; these figures are also steadier than the
rates on a busy machine.
The same streams also pass through a bare pass-through (`serve_bare`: an aiohttp server
that forwards each chunk with the same client and server calls as the tap, and reads
nothing): what any proxy process in Python adds on this machine, the floor for the tap.
`make bench-tap` runs 200 streams of 500 frames; `--smoke` runs 4 of 50. `--rate`
paces each stream (frames per second): unpaced, every process is saturated and the
latencies are mostly time spent queued.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from relay.connectors.sse import SSEParser


@dataclass
class Run:
    frames: int
    seconds: float
    latencies: list[float]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies) or [0.0]
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


def turn_frames(stream: int, frames: int) -> list[tuple[bytes, dict[str, object]]]:
    ids = {"chatId": f"chat_bench_{stream % 50}", "turnId": f"turn_{stream}"}
    out: list[tuple[bytes, dict[str, object]]] = [(b"turn.started", ids)]
    for i in range(frames - 3):
        out.append((b"message.part.updated", {**ids, "part": {"type": "text", "text": f"t{i}"}}))
    out.append((b"session.usage", {**ids, "usage": {"inputTokens": 10, "costMicros": 5}}))
    out.append((b"turn.completed", {**ids, "usage": {"inputTokens": 10, "costMicros": 5}}))
    return out


def serve_bare(port: int, upstream: str) -> None:
    """Pass each answer of `upstream` through, chunk by chunk, reading nothing."""

    async def client(app: web.Application) -> AsyncIterator[None]:
        app["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["http"].close()

    async def respond(request: web.Request) -> web.StreamResponse:
        url = f"{upstream}/agent/v1/chat/{request.match_info['stream']}/respond"
        async with request.app["http"].post(url, data=await request.read()) as answer:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_post("/agent/v1/chat/{stream}/respond", respond)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_upstream(port: int, frames: int, rate: float) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        stream = int(request.match_info["stream"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for kind, data in turn_frames(stream, frames):
            body = orjson.dumps({**data, "type": kind.decode(), "ts": time.time()})
            await response.write(b"event: " + kind + b"\ndata: " + body + b"\n\n")
            if rate:
                await asyncio.sleep(1 / rate)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/agent/v1/chat/{stream}/respond", respond)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def read_streams(base: str, streams: int) -> Run:
    latencies: list[float] = []
    frames = 0

    async def one(http: aiohttp.ClientSession, n: int) -> None:
        nonlocal frames
        parser = SSEParser()
        async with http.post(f"{base}/agent/v1/chat/{n}/respond", json={"parts": []}) as resp:
            assert resp.status == 200, resp.status
            async for chunk in resp.content.iter_any():
                now = time.time()
                for frame in parser.feed(chunk):
                    latencies.append(now - orjson.loads(frame.data)["ts"])
                    frames += 1

    began = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http, n) for n in range(streams)))
    return Run(frames, time.perf_counter() - began, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0, help="frames/s per stream; 0: unpaced")
    parser.add_argument("--rounds", type=int, default=5, help="of each way, alternating")
    parser.add_argument("--smoke", action="store_true", help="4 streams of 50 frames")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.frames, args.rate)
        return
    if args.serve_bare:
        serve_bare(args.serve_bare[0], f"http://127.0.0.1:{args.serve_bare[1]}")
        return
    if args.smoke:
        args.streams, args.frames, args.rounds = 4, 50, 1
    from bench.ingest import free_port, wait_healthy

    with tempfile.TemporaryDirectory(prefix="relay-bench-tap-") as tmp:
        up_port, port, bare_port = free_port(), free_port(), free_port()
        upstream_cmd = [
            *(sys.executable, "-m", "bench.tap"),
            *("--serve-upstream", str(up_port), "--frames", str(args.frames)),
            *("--rate", str(args.rate)),
        ]
        config = Path(tmp) / "relay.toml"
        config.write_text(
            f'[server]\nport = {port}\n[store]\nurl = "sqlite:///{tmp}/bench.db"\n'
            '[log]\nrequests = false\n[[sources]]\nid = "bench"\nprovider = "casedev"\n'
            f'verify = "none"\nupstream = "http://127.0.0.1:{up_port}"\n'
        )
        relay_cmd = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
        quiet = subprocess.DEVNULL
        upstream = subprocess.Popen(upstream_cmd, stdout=quiet, stderr=quiet)
        relay = subprocess.Popen(relay_cmd, stdout=quiet, stderr=quiet)
        bare_cmd = [sys.executable, "-m", "bench.tap", "--serve-bare", str(bare_port), str(up_port)]
        bare = subprocess.Popen(bare_cmd, stdout=quiet, stderr=quiet)
        try:
            wait_for_port(up_port)
            wait_for_port(bare_port)
            wait_healthy(f"http://127.0.0.1:{port}")
            direct_base, bare_base = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{bare_port}"
            tap_base = f"http://127.0.0.1:{port}/v1/tap/bench"
            asyncio.run(read_streams(tap_base, 1))  # the store's writer starts on first use
            wait_idle(relay.pid)
            ways: dict[str, list[Run]] = {"direct": [], "bare": [], "tap": []}
            direct_cpu, tap_cpu = Cpu(0.0, 0.0), Cpu(0.0, 0.0)
            for _ in range(args.rounds):  # alternating, so that a slow moment hits all ways
                up_before, reader_before = cpu_seconds(upstream.pid)[0], time.process_time()
                ways["direct"].append(asyncio.run(read_streams(direct_base, args.streams)))
                direct_cpu += Cpu(
                    cpu_seconds(upstream.pid)[0] - up_before, time.process_time() - reader_before
                )
                ways["bare"].append(asyncio.run(read_streams(bare_base, args.streams)))
                cpu_before = cpu_seconds(relay.pid)
                up_before, reader_before = cpu_seconds(upstream.pid)[0], time.process_time()
                ways["tap"].append(asyncio.run(read_streams(tap_base, args.streams)))
                reader_cpu = time.process_time() - reader_before
                wait_idle(relay.pid)  # what the relay stores after the streams end counts too
                cpu_after = cpu_seconds(relay.pid)
                relay_cpu, writer_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
                tap_cpu += Cpu(
                    cpu_seconds(upstream.pid)[0] - up_before, reader_cpu, relay_cpu, writer_cpu
                )
        finally:
            for proc in (relay, bare, upstream):
                proc.terminate()
                proc.wait(timeout=30)
    expected = args.streams * args.frames
    direct, through_bare, tapped = (median(ways[name]) for name in ("direct", "bare", "tap"))
    print(f"{args.streams} streams x {args.frames} frames, {args.rounds} rounds (median shown)")
    for name, run in (("direct", direct), ("bare", through_bare), ("tap", tapped)):
        print(
            f"{name:<7} {run.frames:>8} frames {run.fps:>10.0f} frames/s"
            f"  latency p50 {run.pct(0.5):.2f} ms  p99 {run.pct(0.99):.2f} ms"
        )
    frames = {name: sum(run.frames for run in runs) for name, runs in ways.items()}
    if tap_cpu.relay >= 0:
        for name, cpu in (("direct", direct_cpu), ("tap", tap_cpu)):
            print(f"cpu per frame {name:<7} {cpu.per_frame(frames[name])}")
        print(
            f"cpu ratio direct/tap {direct_cpu.total / max(tap_cpu.total, 1e-9):.2f}"
            " (about the throughput ratio where the processes saturate the machine)"
        )
    rounds = ", ".join(
        f"{t.fps / d.fps:.2f}" for d, t in zip(ways["direct"], ways["tap"], strict=True)
    )
    print(f"ratio tap/direct {tapped.fps / direct.fps:.2f} (target >= 0.8; each round: {rounds})")
    print(
        f"added per frame: p50 {tapped.pct(0.5) - direct.pct(0.5):.2f} ms"
        f"  p99 {tapped.pct(0.99) - direct.pct(0.99):.2f} ms (target p99 <= 5 ms)"
    )
    print(
        f"added by a bare pass-through (the floor): p50"
        f" {through_bare.pct(0.5) - direct.pct(0.5):.2f} ms"
        f"  p99 {through_bare.pct(0.99) - direct.pct(0.99):.2f} ms;"
        f" its ratio {through_bare.fps / direct.fps:.2f}"
    )
    if any(run.frames != expected for runs in ways.values() for run in runs):
        sys.exit(f"frames lost: expected {expected} each way")


def median(runs: list[Run]) -> Run:
    """The run of median rate."""
    return sorted(runs, key=lambda run: run.fps)[len(runs) // 2]


@dataclass
class Cpu:
    """CPU seconds each process used for one way of reading the streams."""

    upstream: float
    readers: float
    relay: float = 0.0
    writer: float = 0.0

    @property
    def total(self) -> float:
        return self.upstream + self.readers + self.relay + self.writer

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.upstream + other.upstream,
            self.readers + other.readers,
            self.relay + other.relay,
            self.writer + other.writer,
        )

    def per_frame(self, frames: int) -> str:
        parts = [("upstream", self.upstream), ("readers", self.readers)]
        if self.relay:
            parts += [("relay", self.relay), ("writer", self.writer)]
        us = [(name, seconds / max(frames, 1) * 1e6) for name, seconds in parts]
        total = sum(value for _, value in us)
        return " + ".join(f"{name} {value:.1f}" for name, value in us) + f" = {total:.1f} us"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user and system) a process and its children (the store's writer) have
    used so far; -1 where /proc is not."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return -1.0, -1.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own, sum(max(sum(cpu_seconds(int(child))), 0.0) for child in children)


def wait_idle(pid: int, timeout: float = 15) -> None:
    """Wait until a process (with its children) has used next to no CPU for half a
    second, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    used = sum(cpu_seconds(pid))
    while used >= 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        used, before = sum(cpu_seconds(pid)), used
        if used - before < 0.02:
            return


def wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


if __name__ == "__main__":
    main()
