"""The provider fixtures under tests/fixtures/<provider>/: requests and expected state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from relay.config import SourceSettings
from relay.events import Event
from relay.ingest import Source
from relay.normalize import decoder
from relay.pipeline import Request, to_events
from relay.providers import WEBHOOK_PROVIDERS
from relay.providers.canonical import encode
from relay.state import SessionRecord
from relay.timefmt import format_time, parse_time

ROOT = Path(__file__).resolve().parent / "fixtures"
PROVIDERS = ("casedev", "motus", "llamacloud", "scriberr", "casey", "generic", "mapping")


@dataclass(frozen=True)
class FixtureRequest:
    body: bytes
    content_type: str
    stream_id: str | None
    session_id: str | None
    received_at: datetime


def source_settings(provider: str, **extra: Any) -> SourceSettings:
    manifest = json.loads((ROOT / provider / "requests.json").read_text())
    if "source_file" in manifest:
        table = json.loads((ROOT / provider / manifest["source_file"]).read_text())
    else:
        table = manifest["source"]
    return SourceSettings(**{"verify": "none", **table, **extra})


def requests(provider: str) -> list[FixtureRequest]:
    manifest = json.loads((ROOT / provider / "requests.json").read_text())
    out = []
    for entry in manifest["requests"]:
        raw = (ROOT / provider / entry["file"]).read_bytes()
        bodies = [orjson.dumps(item) for item in orjson.loads(raw)] if entry.get("each") else [raw]
        for body in bodies:
            out.append(
                FixtureRequest(
                    body,
                    entry.get("content_type", "application/json"),
                    entry.get("stream_id"),
                    entry.get("session_id"),
                    parse_time(entry["received_at"]),
                )
            )
    return out


def expected(provider: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / provider / "expected.json").read_text())
    return data


def stored_events(provider: str) -> list[Event]:
    """The fixture's canonical events as the store reads them back."""
    settings = source_settings(provider)
    return [e for item in requests(provider) for e in request_events(settings, item)]


def request_events(settings: SourceSettings, item: FixtureRequest) -> list[Event]:
    """One request's canonical events as the store reads them back."""
    source = Source.from_settings(settings)
    decode = decoder({settings.id: settings.provider})
    headers = {} if item.stream_id is None else {"webhook-id": item.stream_id}
    request = Request(headers, item.body, item.content_type, item.session_id)
    events = []
    for event in to_events(source, request, item.received_at):
        single = item.content_type == "application/json" and settings.provider in WEBHOOK_PROVIDERS
        payload = item.body if single else encode(event)
        events.append(decode(source.id, payload, format_time(item.received_at)))
    return events


def observed(record: SessionRecord, want: dict[str, Any]) -> dict[str, Any]:
    """The parts of a derived state that `want` (an expected.json) names."""
    session = record.session.to_dict()
    got: dict[str, Any] = {k: session[k] for k in want if k != "turns"}
    got["turns"] = {}
    for turn_id, fields in want["turns"].items():
        turn = record.turns[turn_id].to_dict() if turn_id in record.turns else {}
        got["turns"][turn_id] = {k: turn.get(k) for k in fields}
    got["turns"] = {**got["turns"], **{t: "?" for t in record.turns if t not in want["turns"]}}
    return got


def observed_dict(
    session: dict[str, Any], turns: dict[str, dict[str, Any]], want: dict[str, Any]
) -> dict[str, Any]:
    """`observed` for a session and its turns as the read API shows them."""
    got: dict[str, Any] = {k: session[k] for k in want if k != "turns"}
    got["turns"] = {
        turn_id: {k: turns.get(turn_id, {}).get(k) for k in fields}
        for turn_id, fields in want["turns"].items()
    }
    got["turns"] = {**got["turns"], **{t: "?" for t in turns if t not in want["turns"]}}
    return got
