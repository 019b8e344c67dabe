"""Trusted boot (seal, verify, refuse to start, runtime alarm) and the security CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.config import load_settings
from xcstack.security import cli as sec_cli
from xcstack.security import trust
from xcstack.security.audit.log import AuditLog
from xcstack.security.keys import KeyVerifier, local_signer
from xcstack.security.settings import AuditSettings

from .conftest import audit_records


def _tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "a.py").write_text("print('a')\n")
    (code / "pkg" / "__pycache__").mkdir()
    (code / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"ignored")
    cfg = tmp_path / "xcstack.toml"
    cfg.write_text("[server]\nport = 8001\n")
    models = tmp_path / "data" / "models" / "m1"
    models.mkdir(parents=True)
    (models / "model.onnx").write_bytes(os.urandom(4096))
    return code, cfg, models / "model.onnx"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xcstack")
    p.add_argument("--config", "-c", default=None)
    sub = p.add_subparsers(dest="command", required=True)
    sec_cli.register(sub)
    return p


def _cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    code, cfg, model = _tree(tmp_path)
    monkeypatch.setattr(trust, "code_root", lambda: code)
    monkeypatch.setenv("XC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XC_CRYPTO__ENABLED", "false")  # local SM2 key file; the keystore path is covered in test_http
    assert _cli("--config", str(cfg), "trust", "seal") == 0
    return code, cfg, model


def test_seal_then_verify_ok(sealed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, cfg, model = sealed
    settings = load_settings(cfg)
    manifest = json.loads(trust.manifest_path(settings).read_text())
    names = set(manifest["files"])
    assert str(code / "pkg" / "a.py") in names and str(cfg.resolve()) in names and str(model.resolve()) in names
    assert not any("__pycache__" in n for n in names)
    assert _cli("--config", str(cfg), "trust", "verify") == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["modify_code", "modify_config", "modify_model", "delete", "add", "manifest"])
def test_any_mismatch_is_named(sealed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                               change: str) -> None:
    code, cfg, model = sealed
    target = {"modify_code": code / "pkg" / "a.py", "modify_config": cfg, "modify_model": model,
              "delete": code / "pkg" / "a.py", "add": code / "pkg" / "evil.py"}.get(change)
    settings = load_settings(cfg)
    if change.startswith("modify"):
        assert target is not None
        with open(target, "ab") as fh:
            fh.write(b"\n# tampered\n")
    elif change == "delete":
        assert target is not None
        target.unlink()
    elif change == "add":
        assert target is not None
        target.write_text("import os\n")
    else:  # edit the manifest itself to bless a tampered file: the signature breaks
        path = trust.manifest_path(settings)
        m = json.loads(path.read_text())
        m["files"][str(code / "pkg" / "a.py")] = "00" * 32
        path.write_text(json.dumps(m))
        target = path
    capsys.readouterr()
    assert _cli("--config", str(cfg), "trust", "verify") == 1
    out = capsys.readouterr().out
    assert str(target.resolve() if change != "add" else target) in out


def test_mismatch_refuses_start_with_audit_record(sealed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    code, cfg, _ = sealed
    (code / "pkg" / "a.py").write_text("print('patched')\n")
    script = (
        "import sys; from pathlib import Path; from xcstack.security import trust;"
        f"trust.code_root = lambda: Path({str(code)!r});"
        "from xcstack.config import load_settings;"
        f"trust.verify_or_refuse(load_settings({str(cfg)!r})); print('STARTED')"
    )
    env = {**os.environ, "XC_DATA_DIR": str(tmp_path / "data"), "XC_CRYPTO__ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert "STARTED" not in proc.stdout
    assert "refusing to start" in proc.stderr and str(code / "pkg" / "a.py") in proc.stderr
    recs = [r for r in audit_records(tmp_path / "data" / "audit") if r["action"] == "trust.verify"]
    assert recs and recs[-1]["outcome"] == "failure" and recs[-1]["detail"]["phase"] == "boot"
    # and the chain written by the refusing process verifies (signed with the local key)
    assert _cli("--config", str(cfg), "audit", "verify") == 0


def test_verify_or_refuse_passes_when_sealed(sealed: tuple[Path, Path, Path]) -> None:
    _, cfg, _ = sealed
    trust.verify_or_refuse(load_settings(cfg))


def test_no_manifest_refuses_only_when_required(tmp_path: Path) -> None:
    trust.verify_or_refuse(load_settings(None, data_dir=tmp_path, crypto={"enabled": False}))
    with pytest.raises(SystemExit) as exc:
        trust.verify_or_refuse(load_settings(None, data_dir=tmp_path, crypto={"enabled": False},
                                             security={"trust_required": True}))
    assert exc.value.code != 0 and "no trusted-boot manifest" in str(exc.value.code)


async def test_runtime_monitor_alarms(sealed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    code, cfg, _ = sealed
    settings = load_settings(cfg)
    signer = local_signer(settings.data_dir, settings.security.signing_key)
    log = AuditLog(tmp_path / "rt-audit", AuditSettings(), chain="rt", signer=signer)
    await log.open()
    mon = trust.TrustMonitor(settings, log, signer)
    assert mon.enabled and (await mon.check()).ok
    before = trust.TRUST_FAILURES._value.get()
    (code / "pkg" / "a.py").write_text("print('runtime patch')\n")
    report = await mon.check()
    assert not report.ok and trust.TRUST_FAILURES._value.get() == before + 1
    assert trust.TRUST_OK._value.get() == 0
    await log.close()
    recs = [r for r in audit_records(tmp_path / "rt-audit") if r["action"] == "trust.verify"]
    assert recs[-1]["outcome"] == "failure" and recs[-1]["detail"]["phase"] == "runtime"
    assert await KeyVerifier(settings)(signer.key_id, b"x", b"bad") is False
    with pytest.raises(LookupError):
        await KeyVerifier(settings)("local:missing", b"x", b"bad")


def test_user_and_audit_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XC_CRYPTO__ACCESS", "direct")
    assert _cli("user", "bootstrap") == 0
    out = capsys.readouterr().out
    assert "admin" in out and "secadmin" in out and "auditor" in out
    assert _cli("user", "create", "ops1", "--kind", "service") == 0
    assert "one-time password" in capsys.readouterr().out
    assert _cli("user", "set-roles", "ops1", "sysadmin") == 0
    assert _cli("user", "disable", "ops1") == 0
    assert _cli("user", "list") == 0
    listing = capsys.readouterr().out
    assert "ops1" in listing and "disabled" in listing and "sysadmin" in listing
    assert _cli("user", "create", "ops1") == 1  # exists: clean error, exit 1
    assert "user_exists" in capsys.readouterr().err
    # the CLI's own actions are in the audit log, and the chain verifies with keystore signatures
    recs = audit_records(tmp_path / "data" / "audit")
    assert {"user.create", "user.roles", "user.disable"} <= {r["action"] for r in recs}
    assert all(r["actor"].startswith(("cli:", "system")) for r in recs)
    assert _cli("audit", "verify") == 0
    out = capsys.readouterr().out
    assert "OK" in out and "signatures checked" in out
    # tamper, and verify names the position
    seg = sorted((tmp_path / "data" / "audit").rglob("seg-*.log"))[0]
    lines = seg.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"outcome":"success"', b'"outcome":"failure"')
    seg.write_bytes(b"".join(lines))
    assert _cli("audit", "verify") == 1
    assert "first bad record at seq 2" in capsys.readouterr().out


def test_user_totp_cli_prints_uri_and_qr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import pyotp

    monkeypatch.setenv("XC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XC_CRYPTO__ENABLED", "false")
    assert _cli("user", "create", "hank") == 0
    secrets_seen: list[str] = []

    def fake_input(prompt: str) -> str:
        uri = capsys.readouterr().out.split("otpauth URI: ")[1].split()[0]
        secret = pyotp.parse_uri(uri).secret
        secrets_seen.append(secret)
        return str(pyotp.TOTP(secret).now())

    monkeypatch.setattr("builtins.input", fake_input)
    assert _cli("user", "totp", "hank") == 0
    out = capsys.readouterr().out
    assert "Recovery codes" in out and secrets_seen


def test_runtime_monitors_of_several_workers_take_turns(sealed: tuple[Path, Path, Path]) -> None:
    _, cfg, _ = sealed
    settings = load_settings(cfg)
    a, b = trust.TrustMonitor(settings, None, None), trust.TrustMonitor(settings, None, None)
    assert a._my_turn() is True
    assert b._my_turn() is False  # within the interval: the other worker verified already


async def test_unknown_signing_key_is_named(sealed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from xcstack.security.audit.verify import verify_chain

    _, cfg, _ = sealed
    settings = load_settings(cfg)
    path = trust.manifest_path(settings)
    m = json.loads(path.read_text())
    m["key_id"] = "local:nonexistent"
    path.write_text(json.dumps(m))
    report = await trust.verify(settings, KeyVerifier(settings))
    assert not report.ok and "no trusted public key" in report.first
    # the same for audit checkpoints signed by a key the verifier cannot find
    log = AuditLog(tmp_path / "a", AuditSettings(), chain="k", signer=__import__(
        "xcstack.security.signing", fromlist=["SoftSM2Signer"]).SoftSM2Signer("local:elsewhere"))
    await log.open()
    await log.close()
    rep = await verify_chain(tmp_path / "a" / "k", KeyVerifier(settings))
    assert rep.problem is not None and "no trusted public key for key id 'local:elsewhere'" in rep.problem.reason
