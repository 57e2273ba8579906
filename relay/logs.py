"""structlog set-up: JSON lines in production, a readable console format for people."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
import structlog

from relay.config import LogSettings

FLUSH_BYTES = 64 * 1024
REPEAT_INTERVAL_SECONDS = 30.0


class BufferedLineLogger:
    """A structlog logger that writes JSON lines with few system calls.

    Debug and info lines collect in a buffer that is written when it holds 64 KiB or
    when `flush()` is called (the server does so every 250 ms and on shutdown); a
    warning or worse is written at once, with everything before it.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()

    def msg(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message + b"\n")
            self._size += len(message) + 1
            if self._size >= FLUSH_BYTES:
                self._write()

    def urgent(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message + b"\n")
            self._write()

    def flush(self) -> None:
        with self._lock:
            if self._lines:
                self._write()

    def _write(self) -> None:
        self._file.write(b"".join(self._lines))
        self._file.flush()
        self._lines.clear()
        self._size = 0

    debug = info = msg
    warning = error = critical = exception = fatal = urgent


class _LoggerFactory:
    def __init__(self, logger: BufferedLineLogger, level: int) -> None:
        self.logger = logger
        self.level = level

    def __call__(self, *args: Any) -> BufferedLineLogger:
        return self.logger


def configure_logging(settings: LogSettings, stream: BinaryIO | None = None) -> None:
    """Configure structlog for the process; returns nothing, see `flush_logs`."""
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    # No contextvars merging: it costs as much as the rest of the chain, and the
    # request line already carries its request id explicitly.
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if settings.format == "json":
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=_LoggerFactory(BufferedLineLogger(stream or sys.stdout.buffer), level),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
            cache_logger_on_first_use=True,
        )


def flush_logs() -> None:
    """Write out buffered log lines (JSON format only; a no-op otherwise)."""
    factory = structlog.get_config()["logger_factory"]
    if isinstance(factory, _LoggerFactory):
        factory.logger.flush()


def request_line_writer() -> Callable[..., None]:
    """How the HTTP layer writes its one line per request.

    With JSON logs the line is rendered straight into the buffered sink, with the same
    fields structlog's renderer would give it: the processor chain costs more than the
    rest of a small request, and this line is written for every one.
    """
    factory = structlog.get_config()["logger_factory"]
    if not isinstance(factory, _LoggerFactory):
        log = structlog.get_logger("relay.http")
        return lambda **fields: log.info("request", **fields)
    if factory.level > logging.INFO:
        return lambda **fields: None
    sink = factory.logger

    def write(**fields: Any) -> None:
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        sink.msg(orjson.dumps(fields))

    return write


class RepeatedWarnings:
    """Lets an identical warning through once per `interval` seconds and counts the rest,
    so that a lasting fault (a full disk) is said twice a minute, not five times a second.
    """

    def __init__(
        self,
        interval: float = REPEAT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        keep: int = 100,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._keep = keep
        self._said: OrderedDict[str, tuple[float, int]] = OrderedDict()  # when, held back

    def admit(self, key: str) -> int | None:
        """None to hold this warning back; else how many like it were held back before it."""
        now = self._clock()
        said = self._said.get(key)
        if said is not None and now - said[0] < self._interval:
            self._said[key] = (said[0], said[1] + 1)
            return None
        self._said[key] = (now, 0)
        self._said.move_to_end(key)
        while len(self._said) > self._keep:
            self._said.popitem(last=False)
        return 0 if said is None else said[1]
