"""Logging: JSON lines, one per request with its request id; warnings written at once."""

from __future__ import annotations

import io
from collections.abc import Iterator

import orjson
import pytest
import structlog

from relay.config import LogSettings
from relay.logs import BufferedLineLogger, configure_logging, flush_logs
from tests.conftest import RelayFactory, fixture_events
from tests.test_ingest import signed


@pytest.fixture
def log_stream() -> Iterator[io.BytesIO]:
    stream = io.BytesIO()
    configure_logging(LogSettings(format="json"), stream=stream)
    yield stream
    structlog.reset_defaults()


def lines(stream: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_info_lines_wait_for_flush_and_warnings_do_not() -> None:
    """Info lines are buffered until flush; a warning writes everything at once."""
    stream = io.BytesIO()
    logger = BufferedLineLogger(stream)
    logger.info(b'{"a":1}')
    assert stream.getvalue() == b""
    logger.warning(b'{"b":2}')
    assert stream.getvalue() == b'{"a":1}\n{"b":2}\n'
    logger.info(b'{"c":3}')
    logger.flush()
    assert stream.getvalue().endswith(b'{"c":3}\n')


async def test_each_request_logs_one_line_with_its_request_id(
    log_stream: io.BytesIO, start_relay: RelayFactory
) -> None:
    """An accepted and a rejected ingest each log a request line; the rejection a warning."""
    relay = await start_relay(log={"requests": True, "format": "json"})
    body = orjson.dumps(fixture_events()[0])
    ok = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    bad = await relay.client.post(
        "/v1/ingest/casedev", data=body, headers={"X-Request-Id": "req-from-client"}
    )
    flush_logs()
    logged = lines(log_stream)
    requests = [line for line in logged if line["event"] == "request"]
    assert [r["status"] for r in requests] == [202, 401]
    assert requests[0]["request_id"] == ok.headers["X-Request-Id"]
    assert requests[1]["request_id"] == bad.headers["X-Request-Id"] == "req-from-client"
    rejected = [line for line in logged if line["event"] == "ingest.rejected"]
    assert rejected[0]["code"] == "MISSING_SIGNATURE"
    assert rejected[0]["level"] == "warning"
    assert SECRET_TEXT not in log_stream.getvalue()


SECRET_TEXT = b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
