"""Crypto test fixtures: settings on a temp data dir, an in-process service, a real owner process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from xcstack.config import Settings, load_settings
from xcstack.crypto.owner import build_service, socket_path
from xcstack.crypto.service import CryptoService

MASTER_HEX = "00112233445566778899aabbccddeeff"


def make_settings(data_dir: Path, **crypto: Any) -> Settings:
    return load_settings(None, data_dir=data_dir, crypto=crypto)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return make_settings(data_dir, access="direct")


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[CryptoService]:
    svc = await build_service(settings)
    try:
        yield svc
    finally:
        svc.close()
        await svc.keystore.store.close()


def owner_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XC_")}
    env.update({"XC_DATA_DIR": str(data_dir), "XC_CRYPTO__ACCESS": "owner", **extra})
    return env


class OwnerProc:
    """The HSM owner as a real child process (what the supervisor runs), restartable."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock = socket_path(load_settings(None, data_dir=data_dir))

    def start(self, timeout: float = 20.0) -> None:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xcstack.crypto.owner"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not self.sock.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"owner exited with {self.proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("owner did not come up")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def owner(data_dir: Path) -> Iterator[OwnerProc]:
    o = OwnerProc(data_dir, owner_env(data_dir))
    o.start()
    try:
        yield o
    finally:
        o.stop()


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


# ---- SoftHSM2 (PKCS#11) ---------------------------------------------------------------------------
SOFTHSM_LIBS = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
SOFTHSM_PIN = "123456"


def softhsm_lib() -> str | None:
    return next((p for p in SOFTHSM_LIBS if os.path.exists(p)), None)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A SoftHSM2 token in a temp dir (SOFTHSM2_CONF), initialised once, serially."""
    import shutil

    lib = softhsm_lib()
    if lib is None or not shutil.which("softhsm2-util"):
        pytest.skip("softhsm2 is not installed (scripts/services/crypto.sh installs it)")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "xcstack", "--pin", SOFTHSM_PIN, "--so-pin", "654321"],
        check=True, capture_output=True, env={**os.environ},
    )
    try:
        yield {"SOFTHSM2_CONF": str(conf), "library": lib}
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def pkcs11_crypto(softhsm: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"backend": "pkcs11", "pkcs11": {"library": softhsm["library"], "token_label": "xcstack",
                                            "pin": SOFTHSM_PIN, **extra}}


# ---- software SDF device (GM/T 0018) ---------------------------------------------------------------
SDF_SOURCE = Path(__file__).parent / "sdf_soft" / "softsdf.c"


def build_softsdf(out_dir: Path, max_bits: int = 512) -> Path:
    import shutil

    if not shutil.which("gcc") or not Path("/usr/include/openssl/evp.h").exists():
        pytest.skip("gcc or OpenSSL headers missing (scripts/services/crypto.sh installs libssl-dev)")
    lib = out_dir / f"libsoftsdf{max_bits}.so"
    if not lib.exists():
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", f"-DECCREF_MAX_BITS={max_bits}", "-o", str(lib), str(SDF_SOURCE),
             "-lcrypto"],
            check=True, capture_output=True,
        )
    return lib


@pytest.fixture(scope="session")
def softsdf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The software SDF library, compiled once per session; device state in a temp dir."""
    build = tmp_path_factory.mktemp("softsdf-build")
    state = tmp_path_factory.mktemp("softsdf-state")
    lib = build_softsdf(build)
    old = {k: os.environ.get(k) for k in ("SOFTSDF_DIR", "SOFTSDF_PASSWORD")}
    os.environ["SOFTSDF_DIR"] = str(state)
    os.environ["SOFTSDF_PASSWORD"] = "device-pw"
    try:
        yield {"library": str(lib), "SOFTSDF_DIR": str(state), "SOFTSDF_PASSWORD": "device-pw", "build": str(build)}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sdf_crypto(softsdf: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"backend": "sdf", "sdf": {"library": softsdf["library"], "key_password": "device-pw", **extra}}
