"""Demo sessions for a `mapping` source: its `[sources.mapping]` table, inverted.

Each lifecycle step of a session is one JSON body whose type is a platform type mapped
onto that step, with each configured pointer set to the demo's value. Steps the type map
does not name are left out; a failing turn completes when `turn.failed` is not mapped.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from relay.providers.demo import DemoRequest
from relay.providers.mapping import MappingSettings


def set_pointer(document: Any, pointer: str, value: Any) -> Any:
    """`document` with `value` at `pointer` (RFC 6901), making the objects on the way;
    the document given is left as it was."""
    if not pointer:
        return value
    token, more, rest = pointer[1:].partition("/")
    token = token.replace("~1", "/").replace("~0", "~")
    out = dict(document) if isinstance(document, dict) else {}
    out[token] = set_pointer(out.get(token), "/" + rest, value) if more else value
    return out


def platform_type(settings: MappingSettings, target: str) -> str | None:
    """The first platform type the map sends to `target`, or None."""
    return next((theirs for theirs, ours in settings.types.items() if ours == target), None)


def mapping_session(
    settings: MappingSettings, rng: random.Random, turns: list[tuple[int, bool]]
) -> Iterator[DemoRequest]:
    """The requests of one demo session: one JSON body per mapped lifecycle step."""
    for name in ("turn.started", "turn.completed"):
        if platform_type(settings, name) is None:
            raise ValueError(f"the mapping's types send nothing to {name!r}")
    session = "sess_" + uuid.uuid4().hex[:12]
    clock = time.time()
    steps: list[tuple[str, dict[str, Any]]] = [("session.created", {}), ("worker.ready", {})]
    for number, fails in turns:
        turn = {"turn": f"resp_{uuid.uuid4().hex[:8]}_{number}"}
        call = {**turn, "tool_call_id": f"call_{number}", "tool_name": "file_search"}
        steps += [("turn.started", turn), ("tool.started", call), ("tool.completed", call)]
        if fails and platform_type(settings, "turn.failed") is not None:
            steps.append(("turn.failed", {**turn, "error": "tool execution failed"}))
        else:
            steps.append(("turn.completed", {**turn, "usage": _usage(rng)}))
    for index, (target, values) in enumerate(steps):
        theirs = platform_type(settings, target)
        if theirs is None:
            continue
        values = {"type": theirs, "session": session, "time": clock + index / 1000, **values}
        body = _document(settings, {"id": "evt_" + uuid.uuid4().hex[:16], **values})
        yield DemoRequest(
            orjson.dumps(body), stream_id="req_" + uuid.uuid4().hex[:16], session_id=session
        )


def _usage(rng: random.Random) -> dict[str, int]:
    given, made = rng.randint(200, 3000), rng.randint(40, 600)
    return {
        "input_tokens": given,
        "output_tokens": made,
        "reasoning_tokens": 0,
        "total_tokens": given + made,
        "cost_micros": rng.randint(100, 9000),
    }


def _document(settings: MappingSettings, values: dict[str, Any]) -> Any:
    document: Any = {}
    for field, value in values.items():
        if field == "usage":
            for key, pointer in settings.usage.items():
                document = set_pointer(document, pointer, value[key])
            continue
        pointer = getattr(settings, field)
        if pointer is not None:
            document = set_pointer(document, pointer, value)
    return document
