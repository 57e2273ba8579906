"""Demo sessions for each provider, as the platform would send them (`relay send --demo`)."""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from relay.providers.frames import NDJSON, SSE

if TYPE_CHECKING:
    from relay.providers.mapping import MappingSettings

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class DemoRequest:
    """One request of a demo: its body, content type, id (stream id) and query session."""

    body: bytes
    content_type: str = JSON
    stream_id: str | None = None
    session_id: str | None = None


def sse(frames: list[dict[str, Any]], named: bool = False) -> bytes:
    """Frames as Server-Sent Events; `named` puts each frame's `event` in the `event:`
    field (and leaves it out of the data)."""
    out = []
    for frame in frames:
        if named:
            data = {k: v for k, v in frame.items() if k != "event"}
            out.append(b"event: " + frame["event"].encode() + b"\ndata: " + orjson.dumps(data))
        else:
            out.append(b"data: " + orjson.dumps(frame))
    return b"\n\n".join(out) + b"\n\n"


def demo_requests(
    provider: str,
    sessions: int = 3,
    seed: int | None = None,
    mapping: MappingSettings | None = None,
) -> list[DemoRequest]:
    """Requests for `sessions` sessions of two to four turns each; in every third session
    the last turn fails, the others complete. A `mapping` demo follows `mapping`, the
    source's table."""
    rng = random.Random(seed)
    makers: dict[str, Callable[[random.Random, list[tuple[int, bool]]], Iterator[DemoRequest]]]
    makers = {
        "motus": _motus,
        "llamacloud": _llamacloud,
        "scriberr": _scriberr,
        "casey": _casey,
    }
    if mapping is not None:
        from relay.providers.demo_mapping import mapping_session

        makers["mapping"] = functools.partial(mapping_session, mapping)
    if provider not in makers:
        raise ValueError(f"no stream demo for provider {provider!r}")
    out: list[DemoRequest] = []
    for index in range(sessions):
        out.extend(makers[provider](rng, _turns(rng, failing=index % 3 == 2)))
    return out


def _turns(rng: random.Random, failing: bool) -> list[tuple[int, bool]]:
    count = rng.randint(2, 4)
    return [(number, failing and number == count) for number in range(1, count + 1)]


def _stream_id() -> str:
    return "req_" + uuid.uuid4().hex[:16]


def _motus(rng: random.Random, turns: list[tuple[int, bool]]) -> Iterator[DemoRequest]:
    session = str(uuid.uuid4())
    for _, fails in turns:
        metrics = {
            "trace_id": "trace_" + uuid.uuid4().hex[:12],
            "total_duration": round(rng.uniform(1, 20), 1),
            "total_tokens": rng.randint(200, 6000),
            "has_error": fails,
        }
        body = {
            "session_id": session,
            "status": "error" if fails else "idle",
            "response": None if fails else "Here is what I found.",
            "error": "tool execution failed" if fails else None,
            "trace_metrics": metrics,
        }
        yield DemoRequest(orjson.dumps(body))


def _llamacloud(rng: random.Random, turns: list[tuple[int, bool]]) -> Iterator[DemoRequest]:
    session = "ses_" + uuid.uuid4().hex[:12]
    for number, fails in turns:
        call = f"call_{number}"
        frames: list[dict[str, Any]] = [
            {"type": "user_input", "content": f"Question {number}"},
            {"type": "tool_call", "call_id": call, "name": "search_index", "arguments": {}},
            {"type": "tool_result", "call_id": call, "name": "search_index", "result": {}},
            {"type": "text_delta", "content": "An answer"},
        ]
        usage = {
            "duration_ms": rng.randint(800, 9000),
            "total_input_tokens": rng.randint(500, 4000),
            "total_output_tokens": 0 if fails else rng.randint(50, 800),
            "turns": 1,
        }
        error = "LLM provider rate limited" if fails else ""
        frames.append({"type": "stop", "error": error, "is_error": fails, "usage": usage})
        body = b"".join(orjson.dumps(f) + b"\n" for f in frames)
        yield DemoRequest(body, NDJSON, _stream_id(), session)


def _scriberr(rng: random.Random, turns: list[tuple[int, bool]]) -> Iterator[DemoRequest]:
    session = "chat_" + uuid.uuid4().hex[:12]
    for number, fails in turns:
        ids = {"session_id": session, "run_id": f"chatrun_{number:02d}", "message_id": "chatmsg"}
        frames: list[dict[str, Any]] = [
            {"event": "chat.run.started", **ids},
            {"event": "chat.delta.content", **ids, "delta": "Partial "},
        ]
        if fails:
            frames.append({"event": "chat.run.failed", **ids, "error": "provider request failed"})
        else:
            prompt, completion = rng.randint(200, 3000), rng.randint(40, 600)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            frames.append({"event": "chat.run.completed", **ids, "usage": usage})
        yield DemoRequest(sse(frames, named=True), SSE, _stream_id())


def _casey(rng: random.Random, turns: list[tuple[int, bool]]) -> Iterator[DemoRequest]:
    conversation = str(uuid.uuid4())
    for _, fails in turns:
        tool = rng.choice(["query_database", "find_deal", "web_search"])
        frames: list[dict[str, Any]] = [
            {"type": "metadata", "conversation_id": conversation},
            {"type": "tool_start", "tool": tool, "label": "Working..."},
            {"type": "tool_end", "tool": tool},
            {"type": "token", "content": "Here"},
        ]
        if fails:
            frames.append({"type": "error", "message": "Something went wrong. Please try again."})
        frames.append({"type": "done"})
        yield DemoRequest(sse(frames), SSE, _stream_id())
