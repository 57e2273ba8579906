"""The `relay` command line: keys, migrate, help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.store.sqlite import migrations


def relay(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/cli.db"\n')
    return path


def test_migrate_applies_once(config: Path) -> None:
    """`relay migrate` applies the migrations, then reports the store up to date."""
    packaged = [version for version, _ in migrations()]
    assert packaged[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert f"applied migrations: {packaged}" in relay(config, "migrate").stdout
    assert "up to date" in relay(config, "migrate").stdout


def test_keys_create_list_revoke(config: Path) -> None:
    """A created key is listed without its secret, and revoking it marks it revoked."""
    relay(config, "migrate")
    created = relay(config, "keys", "create", "--scope", "agent:read", "--name", "dash").stdout
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("rk_")
    key_id = created.split()[1]
    listing = relay(config, "keys", "list").stdout
    assert key_id in listing
    assert "dash" in listing
    assert secret not in listing
    assert f"revoked {key_id}" in relay(config, "keys", "revoke", key_id).stdout
    assert "revoked 20" in relay(config, "keys", "list").stdout
    again = relay(config, "keys", "revoke", key_id, check=False)
    assert again.returncode == 1


def test_keys_create_rejects_unknown_scope(config: Path) -> None:
    """An unknown scope is refused by the argument parser."""
    done = relay(config, "keys", "create", "--scope", "agent:admin", check=False)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["keys", "create"], ["send"], ["migrate"]])
def test_help_describes_every_command(command: list[str]) -> None:
    """`--help` of the CLI and each subcommand exits 0 and describes it."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "usage: relay" in done.stdout
    assert "--config" in done.stdout or not command


def test_serve_on_a_taken_port_exits_with_a_message(tmp_path: Path) -> None:
    """`relay serve` on a port already in use says so and exits 1 (it does not hang)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(f'[server]\nport = {port}\n[store]\nurl = "sqlite:///{tmp_path}/t.db"\n')
        done = relay(config, "serve", check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_serve_without_sources_says_ingest_will_be_refused(tmp_path: Path) -> None:
    """A relay started with no [[sources]] (say, without the config file meant) starts,
    and says on stderr that every ingest will get 404 UNKNOWN_SOURCE."""
    import signal
    import threading

    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nport = 0\n[store]\nurl = "sqlite:///{tmp_path}/t.db"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, proc.kill)  # bounds the read below if nothing comes
    watchdog.start()
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "UNKNOWN_SOURCE" in line:
                break
        assert any("no [[sources]] configured" in line for line in lines), lines
        assert proc.poll() is None  # still serving
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            _, rest = proc.communicate(timeout=60)  # reads stderr to its end, and closes it
        except subprocess.TimeoutExpired:
            proc.kill()
            _, rest = proc.communicate()
    assert proc.returncode == 0, rest


def test_send_without_sources_says_what_is_missing(tmp_path: Path) -> None:
    """`relay send` with a configuration that has no source (none found, say) exits 2 and
    says how to give one, instead of naming a source `None`."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/t.db"\n')
    done = relay(config, "send", "--demo", "--url", "http://127.0.0.1:9", check=False)
    assert done.returncode == 2
    assert "no [[sources]]" in done.stderr
    assert "None" not in done.stderr
