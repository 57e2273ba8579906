"""Configuration from TOML, `RELAY_` environment overrides and `env:` secret references."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads() -> None:
    """config/relay.toml is valid and names the casedev source."""
    settings = load_settings(REPO / "config" / "relay.toml")
    assert settings.server.port == 8080
    assert [s.id for s in settings.sources] == ["casedev"]
    assert settings.store.synchronous == "NORMAL"


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELAY_SERVER__PORT and RELAY_STORE__SYNCHRONOUS override the TOML values."""
    monkeypatch.setenv("RELAY_SERVER__PORT", "9123")
    monkeypatch.setenv("RELAY_STORE__SYNCHRONOUS", "FULL")
    settings = load_settings(REPO / "config" / "relay.toml")
    assert settings.server.port == 9123
    assert settings.store.synchronous == "FULL"
    assert settings.server.host == "127.0.0.1"


def test_env_secret_reference_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret written as env:VAR is read from the environment."""
    monkeypatch.setenv("CASEDEV_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    config = tmp_path / "relay.toml"
    config.write_text('[[sources]]\nid = "c"\nsecrets = ["env:CASEDEV_SECRET"]\n')
    settings = load_settings(config)
    assert settings.sources[0].secrets == ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\nport = "eighty"\n', "server.port"),
        ('[[sources]]\nid = "c"\nverify = "md5"\nsecrets = ["x"]\n', "sources.0.verify"),
        ('[[sources]]\nid = "c"\nsecrets = ["env:NOT_SET_ANYWHERE"]\n', "NOT_SET_ANYWHERE"),
        ('[[sources]]\nid = "c"\nsecrets = ["whsec_!!!"]\n', "whsec_ followed by base64"),
        (
            '[[sources]]\nid = "c"\nverify = "none"\n[[sources]]\nid = "c"\nverify = "none"\n',
            "configured twice",
        ),
        ('[store]\nurl = "mysql://x"\n', "store.url"),
        ("[server]\nprot = 1\n", "server.prot"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    """An invalid config raises ConfigError saying which key and what was expected."""
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(config)


def test_cli_exits_non_zero_on_invalid_config(tmp_path: Path) -> None:
    """`relay serve` with an invalid config prints the problem and exits 2."""
    config = tmp_path / "relay.toml"
    config.write_text('[server]\nport = "eighty"\n')
    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"server.port" in done.stderr
