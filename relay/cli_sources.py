"""`relay sources check` and `relay send --demo --provider`: the providers on the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from relay.config import Settings, SourceSettings


def add_commands(commands: Any, command: Any) -> None:
    """Register `relay sources check` (`command` makes a sub-command with --config)."""
    sources = commands.add_parser(
        "sources", help="Work with configured sources.", description="Work with sources."
    )
    sub = sources.add_subparsers(title="commands", metavar="COMMAND", required=True)
    check = command(
        sub,
        "check",
        "Show the canonical events a payload gives at a source, without storing them.",
        check_source,
    )
    check.add_argument("file", help="a JSON body, an SSE stream or NDJSON lines")
    check.add_argument("--source", required=True, help="the configured source id")
    check.add_argument("--content-type", help="default: from the file's suffix or content")
    check.add_argument("--stream-id", default="stream", help="the stream's id (its {prefix}id)")
    check.add_argument("--session-id", help="the session_id query parameter")


async def check_source(settings: Settings, args: argparse.Namespace) -> int:
    from relay.errors import ApiError
    from relay.providers.canonical import encode
    from relay.providers.check import check_payload, guess_content_type

    source = _source(settings, args.source)
    if source is None:
        return 2
    path = Path(args.file)
    try:
        body = _read(path)
    except OSError as exc:
        print(f"relay: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    content_type = args.content_type or guess_content_type(path, body)
    try:
        events = check_payload(source, body, content_type, args.stream_id, args.session_id)
    except ApiError as exc:
        print(f"relay: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    for event in events:
        print(encode(event).decode())
    return 0


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _source(settings: Settings, source_id: str) -> SourceSettings | None:
    for source in settings.sources:
        if source.id == source_id:
            return source
    print(f"relay: no source {source_id!r} in the configuration", file=sys.stderr)
    return None


async def send_provider_demo(
    settings: Settings, args: argparse.Namespace, url: str, delay: float
) -> int:
    """Send a demo session of `args.provider` to the source configured with it."""
    from relay.providers.demo import demo_requests
    from relay.send import send_requests

    candidates = [s for s in settings.sources if s.provider == args.provider]
    if args.source:
        candidates = [s for s in candidates if s.id == args.source]
    if not candidates:
        print(
            f"relay: no source with provider {args.provider!r}"
            + (f" and id {args.source!r}" if args.source else "")
            + " in the configuration",
            file=sys.stderr,
        )
        return 2
    try:
        requests = demo_requests(args.provider, args.sessions, mapping=candidates[0].mapping)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    answers = await send_requests(url, candidates[0], requests, delay)
    failed = 0
    for request, (status, answer) in zip(requests, answers, strict=True):
        failed += status >= 300
        what = request.stream_id or request.content_type
        print(f"{status}  {what:<28} {orjson.dumps(answer).decode()}")
    return 1 if failed else 0
