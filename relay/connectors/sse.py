"""An incremental Server-Sent Events parser: bytes in as they arrive, frames out.

No I/O. Follows the SSE parsing rules: a blank line dispatches the fields seen since
the last one; an event without data dispatches nothing; comments and `retry` are
skipped; the last event id persists until an `id` field changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_LINE = 1024 * 1024  # a line longer than this is dropped (the stream is not ours)


@dataclass(slots=True)
class RawFrame:
    """One dispatched event: its data lines joined, its `event` name and its id; treat it
    as immutable (not `frozen`: one is built for every frame of a stream)."""

    data: bytes
    name: str | None
    id: str | None  # the frame's own `id` field, if it had one
    last_id: str | None  # the stream's last event id after this frame


@dataclass(slots=True)
class SSEParser:
    last_id: str | None = None
    _rest: list[bytes] = field(default_factory=list)  # the start of a line not ended yet
    _rest_bytes: int = 0
    _data: list[bytes] = field(default_factory=list)
    _name: str | None = None
    _id: str | None = None
    _pending_cr: bool = False

    def feed(self, chunk: bytes) -> list[RawFrame]:
        """The frames `chunk` completes, in order."""
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a CRLF split across chunks
        self._pending_cr = False
        if b"\n" not in chunk and b"\r" not in chunk:  # more of the same line
            self._rest_bytes += len(chunk)
            self._rest.append(chunk)
            if self._rest_bytes > _MAX_LINE:
                self._rest, self._rest_bytes = [], 0
            return []
        whole = b"".join((*self._rest, chunk)) if self._rest else chunk
        lines, rest, self._pending_cr = split_lines(whole)
        kept = 0 < len(rest) <= _MAX_LINE
        self._rest, self._rest_bytes = ([rest], len(rest)) if kept else ([], 0)
        frames: list[RawFrame] = []
        data, name, own_id = self._data, self._name, self._id
        for line in lines:
            if not line:  # dispatch
                if data:
                    frames.append(RawFrame(b"\n".join(data), name, own_id, self.last_id))
                    data = []
                name = own_id = None
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif not line.startswith(b":"):
                key, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                if key == b"data":  # a line `data` without a colon
                    data.append(value)
                elif key == b"event":
                    name = value.decode(errors="replace") or None
                elif key == b"id" and b"\0" not in value:
                    text = value.decode(errors="replace")
                    own_id = self.last_id = text or None
        self._data, self._name, self._id = data, name, own_id
        return frames


def split_lines(data: bytes) -> tuple[list[bytes], bytes, bool]:
    """The lines `data` ends (without their CR, LF or CRLF), what follows the last of
    them, and whether `data` ends in a CR (whose LF may come next)."""
    if b"\r" not in data:  # the usual case: LF only
        *lines, rest = data.split(b"\n")
        return lines, rest, False
    lines = data.splitlines(keepends=True)
    rest = lines.pop() if lines and not lines[-1].endswith((b"\r", b"\n")) else b""
    return [line.rstrip(b"\r\n") for line in lines], rest, data.endswith(b"\r")
