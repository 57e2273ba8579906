"""Opening the store's connection again after it failed for a reason other than contention.

A connection that met a read-only file, a full disk or an I/O error may stay unusable
after the cause is gone (SQLite opens a file it cannot write read-only, and keeps it
so). After such an error the connection is replaced before its next use: at once the
first time, then after a delay that doubles while it keeps failing (up to a cap), so a
lasting fault costs one reopen every few seconds, not one per request. Contention (a
busy or locked database) is not a fault of the connection and changes nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("relay.store")

_CONTENTION = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def is_contention(exc: sqlite3.Error) -> bool:
    """Whether `exc` says only that another connection holds the database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CONTENTION
    return "locked" in str(exc) or "busy" in str(exc)


class Reconnecting:
    """A connection that is replaced after it fails, with backoff while it keeps failing."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        first_delay: float = 0.1,
        max_delay: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._clock = clock
        self._delay = 0.0
        self._reopen_at: float | None = None  # set while the connection is suspect
        self.conn = connect()

    def current(self) -> sqlite3.Connection:
        """The connection to use now: a new one if the last failed and its delay is over."""
        if self._reopen_at is not None and self._clock() >= self._reopen_at:
            self._reopen()
        return self.conn

    def failed(self, exc: BaseException) -> None:
        """Note a failure; a fault of the connection has it reopened before its next use."""
        if not isinstance(exc, sqlite3.Error) or is_contention(exc):
            return
        self._reopen_at = self._clock() + self._delay
        self._delay = min(self._max_delay, max(self._first_delay, self._delay * 2))

    def succeeded(self) -> None:
        self._reopen_at = None
        self._delay = 0.0

    def close(self) -> None:
        self.conn.close()

    def _reopen(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            log.warning("store.reopen_failed", error=str(exc))
            self._reopen_at = self._clock() + self._delay
            self._delay = min(self._max_delay, max(self._first_delay, self._delay * 2))
            return
        old, self.conn = self.conn, conn
        self._reopen_at = None
        with contextlib.suppress(sqlite3.Error):
            old.close()
        log.info("store.connection_reopened")
