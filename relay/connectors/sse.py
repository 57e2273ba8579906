"""An incremental Server-Sent Events parser: bytes in as they arrive, frames out.

No I/O. Follows the SSE parsing rules: a blank line dispatches the fields seen since
the last one; an event without data dispatches nothing; comments and `retry` are
skipped; the last event id persists until an `id` field changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_LINE = 1024 * 1024  # a line longer than this is dropped (the stream is not ours)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One dispatched event: its data lines joined, its `event` name and its id."""

    data: bytes
    name: str | None
    id: str | None  # the frame's own `id` field, if it had one
    last_id: str | None  # the stream's last event id after this frame


@dataclass(slots=True)
class SSEParser:
    last_id: str | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _data: list[bytes] = field(default_factory=list)
    _name: str | None = None
    _id: str | None = None
    _pending_cr: bool = False

    def feed(self, chunk: bytes) -> list[RawFrame]:
        """The frames `chunk` completes, in order."""
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a CRLF split across chunks
        self._pending_cr = False
        self._buffer += chunk
        frames: list[RawFrame] = []
        start = 0
        buffer = self._buffer
        while True:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or (0 <= lf < cr) else cr
            line = bytes(buffer[start:end])
            if buffer[end] == 0x0D:
                if end + 1 < len(buffer):
                    start = end + 2 if buffer[end + 1] == 0x0A else end + 1
                else:
                    start = end + 1
                    self._pending_cr = True
            else:
                start = end + 1
            frame = self._line(line)
            if frame is not None:
                frames.append(frame)
        del buffer[:start]
        if len(buffer) > _MAX_LINE:
            buffer.clear()
        return frames

    def _line(self, line: bytes) -> RawFrame | None:
        if not line:
            data, self._data = self._data, []
            name, self._name = self._name, None
            own_id, self._id = self._id, None
            if not data:
                return None
            return RawFrame(b"\n".join(data), name, own_id, self.last_id)
        if line.startswith(b":"):
            return None
        key, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if key == b"data":
            self._data.append(value)
        elif key == b"event":
            self._name = value.decode(errors="replace") or None
        elif key == b"id" and b"\0" not in value:
            text = value.decode(errors="replace")
            self._id = text or None
            self.last_id = text or None
        return None
