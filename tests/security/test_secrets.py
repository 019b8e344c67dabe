"""Secrets at rest: SM4-GCM sealed, bound to their name, resolvable from config references,
never in clear in the database, the audit log or the logs; buffers zeroed."""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import pytest

from xcstack.crypto.errors import DecryptionFailed
from xcstack.security import cli as sec_cli
from xcstack.security.secretbox import LocalSecretBox, zero
from xcstack.security.secrets import SecretStore
from xcstack.security.service import SecurityService

from .conftest import audit_records

VALUE = b"sk-upstream-VERY-secret-4711"


def test_zero_overwrites_in_place() -> None:
    buf = bytearray(b"password123")
    view = memoryview(buf)
    zero(buf)
    assert bytes(view) == bytes(11)
    zero(bytearray())


async def test_box_binds_aad_and_detects_tampering() -> None:
    box = LocalSecretBox(b"0123456789abcdef")
    sealed = await box.seal(VALUE, b"secret:a")
    assert VALUE not in sealed and sealed.startswith(b"xs1")
    assert bytes(await box.open(sealed, b"secret:a")) == VALUE
    with pytest.raises(DecryptionFailed):
        await box.open(sealed, b"secret:b")  # moved to another name
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        await box.open(bytes(bad), b"secret:a")
    a, b = await box.seal(VALUE, b"x"), await box.seal(VALUE, b"x")
    assert a != b  # fresh nonce each time


async def test_secret_store_roundtrip_and_resolve(service: SecurityService, state: object,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = SecretStore(state, service.box)  # type: ignore[arg-type]
    await store.set("openai", VALUE)
    assert await store.resolve("secret:openai") == VALUE.decode()
    assert await store.resolve("plain-value") == "plain-value"
    assert await store.resolve(None) is None
    rows = await state.fetchall("SELECT * FROM sec_secrets")  # type: ignore[attr-defined]
    assert rows and all(VALUE.decode() not in str(r) for r in rows)
    assert await store.names() == [{"name": "openai", "updated_at": rows[0]["updated_at"]}]
    assert VALUE.decode() not in caplog.text
    with pytest.raises(Exception, match="no secret"):
        await store.reveal("missing")
    assert await store.delete("openai") and not await store.delete("openai")


def test_secret_cli_stores_sealed_and_audits_the_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XC_CRYPTO__ACCESS", "direct")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(VALUE + b"\n")))
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    sec_cli.register(p.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = p.parse_args(list(argv))
        return int(args.func(args))

    assert run("secret", "set", "db-main", "--stdin") == 0
    assert run("secret", "list") == 0
    assert "db-main" in capsys.readouterr().out
    db = (tmp_path / "data" / "state.db").read_bytes()
    assert VALUE not in db
    for f in (tmp_path / "data").rglob("*"):
        if f.is_file():
            assert VALUE not in f.read_bytes(), f
    recs = [r for r in audit_records(tmp_path / "data" / "audit") if r["action"] == "secret.set"]
    assert recs and recs[0]["resource"] == "secret:db-main"
    assert run("secret", "delete", "db-main") == 0
    assert run("secret", "delete", "db-main") == 1
