"""The relay with its store write taken out: the ceiling any store could reach.

`relay serve` exactly as configured (verification, parsing, normalising, middleware,
metrics, the response), except that an ingest is answered at once with a made-up seq
instead of waiting for its commit. Nothing is stored. `bench.ingest --ceiling` measures
it beside the bare handler and the real relay, to tell the request path's own cost from
the store's.

Usage: python -m bench.ceiling_server --config relay.toml
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping

import relay.app
from relay.cli import main
from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.store import IngestRecord, IngestResult, Store
from relay.store.sqlite import SQLiteStore


class UnstoredIngest(SQLiteStore):
    """A SQLite store (for keys, reads, readiness) whose ingest stores nothing."""

    def __init__(
        self, settings: StoreSettings, providers: Mapping[str, str], alerts: AlertSettings
    ) -> None:
        super().__init__(settings, providers, alerts)
        self._seqs = itertools.count(1)

    async def ingest(self, record: IngestRecord) -> IngestResult:
        return IngestResult(next(self._seqs), False)

    async def ingest_many(self, records: list[IngestRecord]) -> list[IngestResult]:
        return [IngestResult(next(self._seqs), False) for _ in records]


def _open_store(
    settings: StoreSettings,
    providers: Mapping[str, str] | None = None,
    alerts: AlertSettings | None = None,
    retention: RetentionSettings | None = None,
) -> Store:
    return UnstoredIngest(settings, providers or {}, alerts or AlertSettings())


if __name__ == "__main__":
    relay.app.open_store = _open_store  # type: ignore[assignment]
    sys.exit(main(["serve", *sys.argv[1:]]))
