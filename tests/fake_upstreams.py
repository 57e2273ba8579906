"""Fake chat platforms on loopback, speaking each seed's streaming format.

`ChatPlatform` answers the chat endpoints of Case.dev (`/respond`, a busy `/message`),
Casey (`/api/chat`), LlamaCloud (`/messages/stream`), Scriberr (`/messages:stream`) and
Motus (a busy `/sessions/{id}/messages`) with the provider fixtures, one frame per write.
`CaseStream` is Case.dev's `/stream`: a buffered session feed replayed after
`Last-Event-ID`, which can cut its connections at chosen frames.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SSE_HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Upstream", "fake"),
    ("Set-Cookie", "a=1; Path=/"),
    ("Set-Cookie", "b=2; Path=/"),
)


def sse_frames(body: bytes) -> list[bytes]:
    """An SSE body cut into its frames, each with its blank line."""
    return [part + b"\n\n" for part in body.strip(b"\n").split(b"\n\n")]


# The stream each seed platform answers with, and the path it answers on.
STREAMS = {
    "casedev": ("agent/v1/chat/chat_cd_7Q/respond", FIXTURES / "casedev" / "respond_1.sse"),
    "casey": ("api/chat", FIXTURES / "casey" / "chat_1.sse"),
    "llamacloud": (
        "api/v1/chat/sess_lc_9/messages/stream",
        FIXTURES / "llamacloud" / "stream_2.sse",
    ),
    "scriberr": (
        "api/v1/chat/sessions/chat_8f2c/messages:stream",
        FIXTURES / "scriberr" / "run_1.sse",
    ),
}


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ChatPlatform:
    """One fake platform serving every seed's chat endpoints."""

    seen: list[Seen] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set up, streams wait for it after frame 2

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        path = request.path.removeprefix("/base").removeprefix("/")
        for name, (stream_path, file) in STREAMS.items():
            if path == stream_path:
                return await self.stream(request, sse_frames(file.read_bytes()), name)
        if path == "agent/v1/chat/chat_cd_7Q/message":
            return busy({"Retry-After": "3", "X-Active-Turn-Id": "turn_2"}, "TURN_CONFLICT")
        if path == "sessions/sess_motus_1/messages":
            return busy({"Retry-After": "5"}, "BUSY")
        if path == "drop/api/chat":
            frames = sse_frames((FIXTURES / "casey" / "chat_1.sse").read_bytes())
            return await self.stream(request, [*frames[:4], frames[4][:10]], "casey", drop=True)
        echo = {"path": request.raw_path, "host": request.headers.get("Host")}
        return web.json_response(echo)

    async def stream(
        self, request: web.Request, frames: list[bytes], name: str, drop: bool = False
    ) -> web.StreamResponse:
        response = web.StreamResponse()
        for key, value in SSE_HEADERS:
            response.headers.add(key, value)
        await response.prepare(request)
        for index, frame in enumerate(frames):
            if index == 2 and self.hold is not None:
                await self.hold.wait()
            await response.write(frame)
            await asyncio.sleep(0)
        if drop:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response


def busy(headers: dict[str, str], code: str) -> web.Response:
    body = {"error": {"message": "A turn is already active on this session", "code": code}}
    return web.Response(
        status=409, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def case_frames(turns: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of a Case.dev session feed: each turn starts, streams two text
    parts, reports its usage and completes."""
    frames: list[tuple[str, str, dict[str, Any]]] = []
    for n in range(1, turns + 1):
        turn = {"chatId": "chat_F", "turnId": f"turn_{n}"}
        usage = {"usage": {"inputTokens": 10, "outputTokens": 5, "costMicros": 100}}
        for event, extra in (
            ("turn.started", {}),
            ("message.part.updated", {"part": {"type": "text", "text": "a"}}),
            ("message.part.updated", {"part": {"type": "text", "text": "ab"}}),
            ("session.usage", {**usage, "summary": {"costMicros": 150}}),
            ("turn.completed", usage),
        ):
            frames.append((str(len(frames) + 1), event, {"type": event, **turn, **extra}))
    return frames


@dataclass
class CaseStream:
    """Case.dev's `/agent/v1/chat/{id}/stream`: frames are published over time and
    replayed after `Last-Event-ID`; `cuts` are frame ids after which the connection
    then open is cut (each once); `fail` answers that many requests with 503."""

    frames: list[tuple[str, str, dict[str, Any]]]
    cuts: set[str] = field(default_factory=set)
    fail: int = 0
    published: int = 0
    connections: list[str | None] = field(default_factory=list)  # Last-Event-ID of each
    authorizations: list[str | None] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    silent: bool = False
    _more: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/agent/v1/chat/{chat_id}/stream", self.handle)
        return app

    async def publish(self, count: int = 1) -> None:
        async with self._more:
            self.published = min(len(self.frames), self.published + count)
            self._more.notify_all()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        self.connections.append(last)
        self.authorizations.append(request.headers.get("Authorization"))
        if request.match_info["chat_id"] == "gone":
            self.statuses.append(404)
            return web.json_response({"error": "not found"}, status=404)
        if self.fail > 0:
            self.fail -= 1
            self.statuses.append(503)
            return web.json_response({"error": "unavailable"}, status=503)
        self.statuses.append(200)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.silent:
            await asyncio.sleep(3600)
        ids = [frame_id for frame_id, _, _ in self.frames]
        sent = ids.index(last) + 1 if last in ids else 0
        while True:
            async with self._more:
                await self._more.wait_for(lambda sent=sent: self.published > sent)
            while sent < self.published:
                frame_id, event, data = self.frames[sent]
                await response.write(
                    b"id: %s\nevent: %s\ndata: %s\n\n"
                    % (frame_id.encode(), event.encode(), orjson.dumps(data))
                )
                sent += 1
                if frame_id in self.cuts:
                    self.cuts.discard(frame_id)
                    await response.write(b"id: 999\nevent: turn.st")  # half a frame, then cut
                    assert request.transport is not None
                    request.transport.close()
                    return response
