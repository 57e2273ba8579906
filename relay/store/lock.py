"""One serving relay per store: an exclusive lock on a file beside the database.

Two relays writing one SQLite file would each number events and changes from what
they last read, and each run its own deliveries. `relay serve` therefore holds an
exclusive `flock` on `<database>.lock` for as long as it runs; the kernel releases it
when the process ends, however it ends. Admin commands do not take it: they may run
beside a serving relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class StoreInUse(Exception):
    """Another process serves this store."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def serving_lock(database: Path) -> Iterator[None]:
    """Hold the store's serving lock, or raise StoreInUse at once if another holds it."""
    path = lock_path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreInUse(
                f"another relay is already serving the store {database} (it holds {path});"
                " stop it first, or give this one another store.url"
            ) from None
        yield
    finally:
        os.close(fd)
