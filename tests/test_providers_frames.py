"""Splitting forwarded bodies into frames, and what the providers make of odd frames."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.events import EventType
from relay.normalize import InvalidEvent
from relay.providers.base import Context, Frame
from relay.providers.casey import Casey
from relay.providers.frames import NDJSON, SSE, parse_frames
from relay.providers.llamacloud import LlamaCloud

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_sse_frames_follow_the_parsing_rules() -> None:
    """Comments and events without data are skipped, data lines join, CRLF counts as a break."""
    body = (
        b': keep-alive\r\n\r\nretry: 3000\r\n\r\nid: e1\r\nevent: a\r\ndata: {"x":\r\n'
        b'data: 1}\r\n\r\nevent: lonely\n\ndata: {"y": 2}\n'
    )
    frames = parse_frames(SSE, body)
    assert frames == [Frame(0, {"x": 1}, "e1", "a"), Frame(1, {"y": 2})]


def test_ndjson_lines_may_carry_sse_fields() -> None:
    """An NDJSON line is a frame's data, or its SSE fields `{event, id, data}`."""
    body = (
        b'{"type": "token"}\n\n{"event": "chat.run.started", "id": "f1", "data": {"run_id": "r"}}\n'
    )
    assert parse_frames(NDJSON, body) == [
        Frame(0, {"type": "token"}),
        Frame(1, {"run_id": "r"}, "f1", "chat.run.started"),
    ]


@pytest.mark.parametrize(
    ("content_type", "body", "frame"),
    [
        (SSE, b'data: {"a": 1}\n\ndata: [1, 2]\n\n', "frame 1"),
        (NDJSON, b'{"a": 1}\n{"a": 2}\n{"a":\n', "frame 2"),
    ],
)
def test_a_frame_that_is_not_an_object_is_named(content_type: str, body: bytes, frame: str) -> None:
    """A frame whose data is not a JSON object is refused by its index."""
    with pytest.raises(InvalidEvent) as caught:
        parse_frames(content_type, body)
    assert caught.value.field == frame


def test_casey_pairs_tools_by_name_in_order() -> None:
    """The n-th `tool_end` of a tool ends its n-th `tool_start`; tokens collapse into one."""
    frames = [
        Frame(0, {"type": "metadata", "conversation_id": "c1"}),
        Frame(1, {"type": "tool_start", "tool": "web_search"}),
        Frame(2, {"type": "tool_start", "tool": "web_search"}),
        Frame(3, {"type": "token", "content": "a"}),
        Frame(4, {"type": "tool_end", "tool": "web_search"}),
        Frame(5, {"type": "token", "content": "b"}),
        Frame(6, {"type": "done"}),
    ]
    events = Casey().events(frames, Context("casey", NOW, "req_9"))
    tools = [(e.type, e.tool_call_id) for e in events if e.tool_call_id]
    assert tools == [
        (EventType.TOOL_STARTED, "req_9:1"),
        (EventType.TOOL_STARTED, "req_9:2"),
        (EventType.TOOL_COMPLETED, "req_9:1"),
    ]
    activity = [e.id for e in events if e.type == EventType.TURN_ACTIVITY]
    assert activity == ["req_9:5"]
    assert {e.session_id for e in events} == {"c1"}


def test_llamacloud_turn_without_stop_still_starts() -> None:
    """A user input followed by another before any stop still starts its own turn."""
    frames = [
        Frame(0, {"type": "user_input", "content": "one"}),
        Frame(1, {"type": "user_input", "content": "two"}),
        Frame(2, {"type": "stop", "is_error": False, "error": "", "usage": {}}),
    ]
    events = LlamaCloud().events(frames, Context("llama", NOW, "s", "ses_1"))
    started = sorted(e.turn_id or "" for e in events if e.type == EventType.TURN_STARTED)
    assert started == ["s:0", "s:1"]
    ended = [e.turn_id for e in events if e.type == EventType.TURN_COMPLETED]
    assert ended == ["s:1"]


def test_frames_without_ids_need_a_stream_id() -> None:
    """A frame without an id in a request that names no stream is refused, naming it."""
    with pytest.raises(InvalidEvent) as caught:
        Casey().events([Frame(0, {"type": "metadata"})], Context("casey", NOW))
    assert caught.value.field == "frame 0: id"
