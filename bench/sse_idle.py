"""Memory per idle SSE connection: relay RSS before and after N streams are opened.

Opens N (default 10,000) `GET /v1/stream` connections from a separate process, waits
until every one has its first frame, and prints the relay's RSS growth per connection
(target: at most 20 KB).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ingest import free_port, relay_config, wait_healthy


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_streams(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` streams, 200 at a time; return once each has sent its `retry:` line."""
    writers: list[asyncio.StreamWriter] = []
    request = b"GET /v1/stream HTTP/1.1\r\nHost: relay\r\n\r\n"

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await reader.readuntil(b"retry: ")
        writers.append(writer)

    for start in range(0, count, 200):
        await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    return writers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        config = relay_config(work, port, log_requests=False)
        config.write_text(
            config.read_text() + "[auth]\nenabled = false\n[sse]\nheartbeat_seconds = 600\n"
        )
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}")
            asyncio.run(open_streams(port, 50))  # warm up: first-use allocations
            time.sleep(1)
            before = rss_kib(relay.pid)
            started = time.monotonic()
            writers = asyncio.run(_hold(port, args.connections, relay.pid))
            after, held = writers
            elapsed = time.monotonic() - started
        finally:
            relay.terminate()
            relay.wait(timeout=60)

    growth = after - before
    per = growth * 1024 / args.connections
    print(f"{held} idle SSE streams open (in {elapsed:.1f} s)")
    print(f"relay RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with them open")
    print(f"growth per connection: {per / 1024:.1f} KiB (target <= 20 KB)")


async def _hold(port: int, count: int, pid: int) -> tuple[int, int]:
    writers = await open_streams(port, count)
    await asyncio.sleep(2)
    rss = rss_kib(pid)
    for writer in writers:
        writer.close()
    return rss, len(writers)


if __name__ == "__main__":
    main()
