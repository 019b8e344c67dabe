"""`xcstack key ...` against the local keystore and through a running HSM owner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.crypto import sm
from xcstack.crypto.cli import register

from .conftest import OwnerProc, owner_env


def run_cli(data_dir: Path, *args: str, access: str = "owner") -> subprocess.CompletedProcess[str]:
    code = (
        "import argparse, sys\n"
        "from xcstack.crypto.cli import register\n"
        "p = argparse.ArgumentParser(); p.add_argument('--config', default=None)\n"
        "register(p.add_subparsers(dest='cmd', required=True))\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    env = owner_env(data_dir, XC_CRYPTO__ACCESS=access)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_without_owner(data_dir: Path) -> None:
    r = run_cli(data_dir, "key", "create", "signer", "--kind", "sm2")
    assert r.returncode == 0, r.stderr
    assert "created signer v1" in r.stdout
    assert run_cli(data_dir, "key", "rotate", "signer").returncode == 0
    r = run_cli(data_dir, "key", "list", "--json")
    keys = json.loads(r.stdout)
    assert keys[0]["name"] == "signer" and keys[0]["version"] == 2 and keys[0]["versions"] == 2
    pem1 = run_cli(data_dir, "key", "export-public", "signer", "--version", "1").stdout
    pem2 = run_cli(data_dir, "key", "export-public", "signer").stdout
    assert sm.SM2PublicKey.from_pem(pem1) != sm.SM2PublicKey.from_pem(pem2)
    r = run_cli(data_dir, "key", "create", "signer")
    assert r.returncode == 1 and "key_exists" in r.stderr
    r = run_cli(data_dir, "key", "export-public", "nope")
    assert r.returncode == 1 and "key_not_found" in r.stderr


def test_cli_goes_through_running_owner(owner: OwnerProc) -> None:
    r = run_cli(owner.data_dir, "key", "create", "k1", "--kind", "sm4")
    assert r.returncode == 0, r.stderr
    r = run_cli(owner.data_dir, "key", "list")
    assert "k1" in r.stdout and "SM4-GCM" in r.stdout


def test_register_adds_key_verbs() -> None:
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["key", "create", "x", "--kind", "hmac-sm3"])
    assert a.kind == "hmac-sm3"
    with pytest.raises(SystemExit):
        p.parse_args(["key", "create", "x", "--kind", "rsa"])
