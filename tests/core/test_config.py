"""Config: TOML + XC_* env, errors that name the key and the reason, secrets masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.config import ConfigError, load_settings, masked_dump


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "xcstack.toml"
    p.write_text(text)
    return p


def test_defaults_are_embedded() -> None:
    s = load_settings()
    assert (s.server.host, s.server.port, s.server.http_server) == ("127.0.0.1", 8000, "granian")
    assert s.state.url is None


def test_toml_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "[server]\nport = 9001\nworkers = 3\n")
    assert load_settings(cfg).server.port == 9001
    monkeypatch.setenv("XC_SERVER__PORT", "9002")
    s = load_settings(cfg)
    assert (s.server.port, s.server.workers) == (9002, 3)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[server]\nport = 70000\n", "server.port", "less than or equal to 65535"),
        ("[server]\nport = 'x'\n", "server.port", "valid integer"),
        ("[server]\nprot = 1\n", "server.prot", "unknown key"),
        ("[server]\nhttp_server = 'nginx'\n", "server.http_server", "'granian' or 'uvicorn'"),
        ("[state]\nurl = 'mysql://x'\n", "state.url", "postgresql://"),
        ("[server]\nplugins = ['no.such.module']\n", "server.plugins", "cannot be imported"),
        ("[nonsense]\na = 1\n", "nonsense", "unknown key"),
    ],
)
def test_invalid_config_names_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    msg = str(info.value)
    assert f"  {key}: " in msg and reason in msg, msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(write(tmp_path, "[server\nport=1"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_env_error_names_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XC_SERVER__WORKERS", "0")
    with pytest.raises(ConfigError, match=r"server\.workers: Input should be greater than or equal to 1"):
        load_settings()


def test_serve_refuses_bad_config_at_start(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[server]\nport = -1\n")
    r = subprocess.run([sys.executable, "-m", "xcstack", "--config", str(cfg), "serve"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "server.port: Input should be greater than or equal to 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[state]\nurl = 'postgresql://xc:hunter2-secret@127.0.0.1/test'\n")
    r = subprocess.run([sys.executable, "-m", "xcstack", "--config", str(cfg), "config", "show"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hunter2-secret" not in r.stdout
    shown = json.loads(r.stdout)
    assert shown["state"]["url"] == "**********"
    assert shown["server"]["port"] == 8000
    assert "hunter2-secret" not in json.dumps(masked_dump(load_settings(cfg)))
