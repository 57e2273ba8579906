"""Does holding 200 long-poll requests slow ingest? Alternating rounds, with and without.

A relay gets 200 sessions, then wrk ingests unique signed events into other sessions
while (in every other round) 200 long-poll requests wait on the first ones. Prints the
ingest rate with and without waiters and their ratio (target: at most 20% slower), and
how fast a waiting request is answered after an ingest changes its session.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from bench.ingest import (
    HERE,
    SECRET,
    free_port,
    relay_config,
    run_wrk,
    wait_healthy,
    write_requests,
)
from relay.sign import sign_standard


def post(url: str, event: dict[str, object]) -> None:
    body = orjson.dumps(event)
    ts = int(time.time())
    msg = f"msg_{event['id']}"
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SECRET, msg, ts, body),
    }
    request = urllib.request.Request(f"{url}/v1/ingest/casedev", body, headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status in (200, 202)


def created(session: str, n: int) -> dict[str, object]:
    return {
        "id": f"evt_wait_{n}",
        "type": "agent.chat.session.created",
        "occurred_at": "2026-11-20T09:00:00.000Z",
        "data": {"chatId": session},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--waiters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20_000)
    args = parser.parse_args()
    wrk_args = argparse.Namespace(threads=1, connections=64)

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        requests_file = work / "requests.tsv"
        write_requests(requests_file, args.per_round * (2 * args.rounds + 1))
        port = free_port()
        config = relay_config(work, port, log_requests=True)
        config.write_text(config.read_text() + "[auth]\nenabled = false\n")
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
            for n in range(args.waiters):
                post(url, created(f"chat_wait_{n:03d}", n))
            run_wrk(url, requests_file, 0, 2, wrk_args)
            rates: dict[bool, list[float]] = {False: [], True: []}
            offset = args.per_round
            for round_number in range(args.rounds):
                for with_waiters in (False, True):
                    waiters = None
                    if with_waiters:
                        waiters = subprocess.Popen(
                            [
                                sys.executable,
                                str(HERE / "longpoll_waiters.py"),
                                url,
                                str(args.waiters),
                            ]
                        )
                        time.sleep(1.5)
                    result = run_wrk(url, requests_file, offset, args.duration, wrk_args)
                    offset += args.per_round
                    rates[with_waiters].append(result.rps)
                    if waiters is not None:
                        waiters.terminate()
                        waiters.wait()
                print(
                    f"round {round_number + 1}: without {rates[False][-1]:.0f}/s,"
                    f" with {args.waiters} waiting {rates[True][-1]:.0f}/s",
                    flush=True,
                )
            wake = wake_latency(url, args.waiters)
        finally:
            relay.terminate()
            relay.wait(timeout=30)

    without = sorted(rates[False])[len(rates[False]) // 2]
    with_waiting = sorted(rates[True])[len(rates[True]) // 2]
    print(f"\ningest without waiters: {without:.0f}/s (median)")
    print(f"ingest with {args.waiters} long-polls waiting: {with_waiting:.0f}/s (median)")
    print(f"slowdown: {100 * (1 - with_waiting / without):.1f}% (target <= 20%)")
    print(f"long-poll answered {wake * 1000:.1f} ms after the ingest that changed its session")


def wake_latency(url: str, waiters: int) -> float:
    """Time from an ingest's answer to a waiting request's answer (median of 5)."""
    import threading

    samples = []
    for n in range(5):
        session = f"chat_wait_{n:03d}"
        with urllib.request.urlopen(f"{url}/v1/sessions/{session}", timeout=10) as resp:
            version = orjson.loads(resp.read())["version"]
        answered: list[float] = []

        def wait(
            session: str = session, version: int = version, answered: list[float] = answered
        ) -> None:
            query = f"{url}/v1/sessions/{session}?wait=true&version={version}&timeout=10"
            with urllib.request.urlopen(query, timeout=15) as resp:
                resp.read()
            answered.append(time.perf_counter())

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.3)
        ready = {
            "id": f"evt_wake_{n}",
            "type": "agent.worker.ready",
            "occurred_at": "2026-11-20T09:00:01.000Z",
            "data": {"chatId": session},
        }
        post(url, ready)
        sent = time.perf_counter()
        thread.join()
        samples.append(answered[0] - sent)
    return sorted(samples)[len(samples) // 2]


if __name__ == "__main__":
    main()
