"""Safe defaults and the first ten minutes: shipped secrets, CLI errors, docs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from relay.sign import sign_standard
from relay.verify import parse_standard_secret
from tests.conftest import Relay
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config" / "relay.toml"
# The secret the README and the shipped configuration once printed for everyone.
PUBLISHED_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]+")


class Served:
    """A `relay serve` subprocess started from a directory, as a user would run it."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", "config/relay.toml"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "RELAY_SERVER__PORT": "0", **(env or {})},
        )
        self.startup = self._read_until_listening()
        match = re.search(r"listening on (http://\S+)", self.startup)
        if match is None:
            self.stop()
            pytest.fail(f"relay serve did not start:\n{self.startup}")
        self.url = match.group(1)

    def _read_until_listening(self) -> str:
        watchdog = threading.Timer(60, self.proc.kill)  # bounds the read if nothing comes
        watchdog.start()
        lines = []
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                if "listening on" in line:
                    break
        finally:
            watchdog.cancel()
        return "".join(lines)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A working directory with the shipped configuration, as after a fresh clone."""
    (tmp_path / "config").mkdir()
    shutil.copy(SHIPPED_CONFIG, tmp_path / "config" / "relay.toml")
    return tmp_path


@pytest.fixture
def served(checkout: Path) -> Iterator[Served]:
    relay = Served(checkout)
    try:
        yield relay
    finally:
        relay.stop()


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def shipped_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed if not name.startswith("tests/")]


def usable_standard_secrets(text: str) -> list[str]:
    usable = []
    for candidate in WHSEC.findall(text):
        try:
            parse_standard_secret(candidate)
        except ValueError:
            continue
        usable.append(candidate)
    return usable


def signed_post(url: str, secret: str, body: bytes) -> httpx.Response:
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": "msg_forged",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard(secret, "msg_forged", now, body),
    }
    return httpx.post(f"{url}/v1/ingest/casedev", content=body, headers=headers, timeout=30)


EVENT = orjson.dumps(
    {
        "id": "evt_forged",
        "type": "agent.worker.ready",
        "occurred_at": "2026-11-20T09:00:02.100Z",
        "data": {"chatId": "chat_forged"},
    }
)


# -- 1. no published secret ---------------------------------------------------------------


def test_shipped_files_carry_no_usable_signing_secret() -> None:
    """No shipped file (config, Dockerfile, README, docs, examples, code) holds a whsec_
    secret that would verify."""
    found = {
        str(path.relative_to(ROOT)): usable_standard_secrets(path.read_text(errors="replace"))
        for path in shipped_files()
        if path.is_file()
    }
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_first_start_generates_a_private_secret_and_prints_it_once(checkout: Path) -> None:
    """The first start generates the source's secret into the data directory (0600) and
    prints it; the second start reuses it without printing it again."""
    first = Served(checkout)
    first.stop()
    stored = orjson.loads((checkout / "data" / "source-secrets.json").read_bytes())
    secret = stored["casedev"]
    parse_standard_secret(secret)
    assert secret in first.startup
    assert "rk_" in first.startup  # beside the admin key
    mode = stat.S_IMODE((checkout / "data" / "source-secrets.json").stat().st_mode)
    assert mode == 0o600
    second = Served(checkout)
    try:
        assert secret not in second.startup
        assert signed_post(second.url, secret, EVENT).status_code == 202
    finally:
        second.stop()
    assert orjson.loads((checkout / "data" / "source-secrets.json").read_bytes()) == stored


def test_demo_is_accepted_by_a_relay_on_the_shipped_config(served: Served) -> None:
    """`relay send --demo` finds the generated secret and every event gets 202."""
    done = run_cli(
        served.cwd, "send", "--demo", "--sessions", "1", "--delay", "0", "--url", served.url
    )
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert statuses, done.stdout
    assert set(statuses) == {"202"}, done.stdout


def test_the_published_secret_is_refused(served: Served) -> None:
    """An event signed with the secret the README once printed gets 401."""
    answer = signed_post(served.url, PUBLISHED_SECRET, EVENT)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "INVALID_SIGNATURE"


def test_a_secret_from_the_environment_is_used_and_nothing_generated(checkout: Path) -> None:
    """A source configured with `env:VAR` verifies with that secret; none is generated."""
    config = checkout / "config" / "relay.toml"
    text = config.read_text().replace(
        'header_prefix = "webhook-"', 'header_prefix = "webhook-"\nsecrets = ["env:MY_SECRET"]'
    )
    config.write_text(text)
    relay = Served(checkout, {"MY_SECRET": PUBLISHED_SECRET.replace("MfKQ", "AbCd")})
    try:
        assert "generated a signing secret" not in relay.startup
        ok = signed_post(relay.url, PUBLISHED_SECRET.replace("MfKQ", "AbCd"), EVENT)
        assert ok.status_code == 202
    finally:
        relay.stop()
    assert not (checkout / "data" / "source-secrets.json").exists()


# -- 15. one line per CLI failure ------------------------------------------------------------


@pytest.fixture
def send_config(tmp_path: Path) -> Path:
    secret = PUBLISHED_SECRET.replace("MfKQ", "WxYz")
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[server]\nport = {free_port()}\n[store]\nurl = "sqlite:///{tmp_path}/t.db"\n'
        f'[[sources]]\nid = "casedev"\nprovider = "casedev"\nsecrets = ["{secret}"]\n'
    )
    return path


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_send_of_a_missing_file_says_so_in_one_line(send_config: Path, tmp_path: Path) -> None:
    """`relay send` of a file that does not exist exits 1 with one line naming it."""
    missing = tmp_path / "nowhere.json"
    done = run_cli(tmp_path, "send", str(missing), "--config", str(send_config))
    assert_one_line_failure(done, str(missing))


def test_send_of_broken_json_says_so_in_one_line(send_config: Path, tmp_path: Path) -> None:
    """`relay send` of a file that is not JSON exits 1 with one line saying so."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "evt_1", "type": ')
    done = run_cli(tmp_path, "send", str(broken), "--config", str(send_config))
    assert_one_line_failure(done, str(broken), "not valid JSON")


def test_send_to_a_relay_that_is_not_running_says_what_to_do(
    send_config: Path, tmp_path: Path
) -> None:
    """`relay send` with no relay listening exits 1 with one line naming `relay serve`."""
    done = run_cli(tmp_path, "send", "--demo", "--sessions", "1", "--config", str(send_config))
    assert_one_line_failure(done, "relay serve", "--url")


def test_send_of_a_list_of_non_objects_says_what_is_expected(
    send_config: Path, tmp_path: Path
) -> None:
    """`relay send` of a JSON list of numbers exits 1 saying events are objects."""
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    done = run_cli(tmp_path, "send", str(numbers), "--config", str(send_config))
    assert_one_line_failure(done, "JSON object")


# -- 16. aiohttp's own errors in the envelope; occurred_at bounds ---------------------------


def raw_exchange(url: str, request: bytes) -> tuple[int, str, dict[str, object]]:
    """Send raw bytes; return the status, the content type and the JSON body."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    return status, content_type, orjson.loads(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"NOT A REQUEST LINE\r\n\r\n", id="bad-request-line"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
            id="header-too-long",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
            + b"\r\n",
            id="too-many-headers",
        ),
    ],
)
def test_unparseable_requests_get_the_json_envelope(served: Served, request_bytes: bytes) -> None:
    """A request aiohttp cannot parse gets 400 BAD_REQUEST in the JSON envelope."""
    status, content_type, body = raw_exchange(served.url, request_bytes)
    assert status == 400
    assert content_type.startswith("application/json")
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "BAD_REQUEST"
    assert error["message"]


async def test_occurred_at_message_states_the_bounds_checked(relay: Relay) -> None:
    """The INVALID_EVENT message names the bounds that are checked: the upper bound
    itself is accepted, a moment past it is refused with a message naming it."""
    event = {"id": "evt_edge", "type": "x.y", "session_id": "s1"}
    at_bound = {**event, "occurred_at": "2999-12-31T00:00:00Z"}
    resp = await relay.client.post("/v1/ingest/open", data=orjson.dumps(at_bound))
    assert resp.status == 202
    past = {**event, "id": "evt_past", "occurred_at": "2999-12-31T00:00:01Z"}
    resp = await relay.client.post("/v1/ingest/open", data=orjson.dumps(past))
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    assert "2999-12-31T00:00:00Z" in message
    assert "1971-01-01T00:00:00Z" in message


# -- 17. the API key from the environment; demo dated up to now ----------------------------


def generated_secret(cwd: Path) -> str:
    secret: str = orjson.loads((cwd / "data" / "source-secrets.json").read_bytes())["casedev"]
    return secret


def test_tail_takes_the_key_from_the_environment(served: Served) -> None:
    """`relay tail` with RELAY_API_KEY set (no --key) follows the stream."""
    admin_key = re.search(r"rk_\S+", served.startup)
    assert admin_key is not None
    assert signed_post(served.url, generated_secret(served.cwd), EVENT).status_code == 202
    done = run_cli(
        served.cwd,
        *("tail", "--url", served.url, "--from", "0", "--count", "1"),
        RELAY_API_KEY=admin_key.group(0),
    )
    assert done.returncode == 0, done.stderr
    assert "chat_forged" in done.stdout


def test_tail_refused_names_both_ways_to_give_a_key(served: Served) -> None:
    """`relay tail` with a wrong key exits 1 naming RELAY_API_KEY and --key."""
    done = run_cli(served.cwd, "tail", "--url", served.url, RELAY_API_KEY="rk_not_a_key")
    assert done.returncode == 1
    assert "RELAY_API_KEY" in done.stderr
    assert "--key" in done.stderr


def test_demo_events_are_dated_up_to_now() -> None:
    """No demo event is dated in the future; the newest happened just now."""
    from datetime import UTC, datetime, timedelta

    from relay.send import demo_lifecycle

    before = datetime.now(UTC) - timedelta(milliseconds=1)
    events = demo_lifecycle(6, seed=5)
    after = datetime.now(UTC)
    times = [datetime.fromisoformat(event["occurred_at"]) for event in events]
    assert max(times) <= after
    assert max(times) >= before - timedelta(seconds=1)
    assert min(times) < max(times)


# -- 18. a health check on the configured port; the README points to docs -----------------


def test_health_asks_the_configured_port(checkout: Path) -> None:
    """`relay health` exits 0 against a relay on the port RELAY_SERVER__PORT names, and
    1 with one line once nothing answers there."""
    port = str(free_port())
    relay = Served(checkout, {"RELAY_SERVER__PORT": port})
    try:
        assert relay.url.endswith(f":{port}")
        done = run_cli(checkout, "health", RELAY_SERVER__PORT=port)
        assert done.returncode == 0, done.stderr
    finally:
        relay.stop()
    done = run_cli(checkout, "health", RELAY_SERVER__PORT=port)
    assert_one_line_failure(done, f":{port}/healthz")


def test_dockerfile_health_check_follows_the_configured_port() -> None:
    """The image's HEALTHCHECK runs `relay health` and names no fixed port."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    check = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\nENTRYPOINT")[0]
    assert "relay" in check
    assert "health" in check
    assert "8080" not in check


def test_readme_is_short_and_its_doc_links_exist() -> None:
    """The README stays short, prints no whsec_ secret, and every docs/ link it has
    names a file that exists."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert usable_standard_secrets(readme) == []
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert {"docs/configuration.md", "docs/api.md", "docs/benchmarks.md"} <= set(links)
    for link in links:
        assert (ROOT / link).is_file(), link
    for name in ("configuration", "api", "operations", "benchmarks", "limits"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
