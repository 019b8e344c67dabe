"""SM2 backends: which one loads (and why not), the choice at import, each backend's own C3 check,
interop with the openssl CLI both ways, threads. The per-operation tests run on every backend in
test_sm.py (its `sm2_backend` fixture)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.crypto.test_sm import sm2_backend  # noqa: F401  (fixture: once per backend)
from xcstack.crypto import sm
from xcstack.crypto.errors import CryptoUnavailable, DecryptionFailed
from xcstack.crypto.primitives import sm2 as sm2_module
from xcstack.crypto.primitives.sm2_backends import AUTO_ORDER, BACKEND_NAMES, load_backend

_PROBE = """
import json
from xcstack.crypto import sm
out = {"info": sm.sm2_backend_info(), "sm3": sm.sm3(b"abc").hex()[:8]}
try:
    k = sm.SM2PrivateKey.generate()
    out["sign"] = k.public_key.verify(b"m", k.sign(b"m"))
except Exception as exc:
    out["sign"] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


def _probe(tmp_path: Path, env: dict[str, str], broken: tuple[str, ...] = ()) -> dict[str, object]:
    """Import xcstack.crypto.sm in a fresh interpreter; each module in `broken` fails to import."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for mod in broken:
        (stubs / f"{mod}.py").write_text(f"raise ImportError('{mod} is broken for this test')\n")
    full = {k: v for k, v in os.environ.items() if not k.startswith("XC_SM2_")}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([str(stubs), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the dev install on x86_64 carries all three")
def test_every_backend_loads_on_the_dev_machine() -> None:
    """So the per-backend tests in test_sm.py really run on each (they skip a backend that does not load)."""
    for name in BACKEND_NAMES:
        b = load_backend(name)
        assert b.name == name and b.version and b.library
    assert load_backend("openssl").constant_time is True
    assert AUTO_ORDER[0] == "openssl"


def test_default_is_openssl_and_info_names_it(tmp_path: Path) -> None:
    out = _probe(tmp_path, {})
    info = out["info"]
    assert isinstance(info, dict)
    assert info["wanted"] == "auto" and info["name"] == "openssl" and info["constant_time"] is True
    assert "OpenSSL 3" in str(info["version"]) and "libcrypto" in str(info["library"])
    assert out["sign"] is True


def test_sm_imports_and_signs_without_gmssl_pyx(tmp_path: Path) -> None:
    """gmssl-pyx is optional now (no aarch64 wheel, no buildable sdist): with it broken, the module and
    everything importing it still load, and SM2 runs on the system OpenSSL."""
    out = _probe(tmp_path, {}, broken=("gmssl_pyx",))
    assert out["sign"] is True and out["info"]["name"] == "openssl"  # type: ignore[index]


def test_auto_falls_back_in_order_and_says_why(tmp_path: Path) -> None:
    no_lib = {"XC_SM2_OPENSSL_LIB": str(tmp_path / "libcrypto-missing.so")}
    out = _probe(tmp_path, no_lib)
    info = out["info"]
    assert isinstance(info, dict)
    assert info["name"] == "gmssl-pyx" and out["sign"] is True
    assert list(info["unavailable"]) == ["openssl"] and "libcrypto-missing.so" in info["unavailable"]["openssl"]
    out = _probe(tmp_path, no_lib, broken=("gmssl_pyx",))
    info = out["info"]
    assert isinstance(info, dict)
    assert info["name"] == "gmalglib" and info["constant_time"] is False and out["sign"] is True
    assert list(info["unavailable"]) == ["openssl", "gmssl-pyx"]


def test_a_configured_backend_never_falls_back(tmp_path: Path) -> None:
    """XC_SM2_BACKEND=name: that backend or no SM2 (503 crypto_unavailable), never another one silently;
    SM3/SM4 keep working so the rest of the process (and doctor) still runs."""
    out = _probe(tmp_path, {"XC_SM2_BACKEND": "gmssl-pyx"}, broken=("gmssl_pyx",))
    info = out["info"]
    assert isinstance(info, dict)
    assert info["name"] is None and "gmssl_pyx is broken" in info["unavailable"]["gmssl-pyx"]
    assert str(out["sign"]).startswith("CryptoUnavailable: no SM2 backend")
    assert out["sm3"] == "66c7f0f4"
    out = _probe(tmp_path, {"XC_SM2_BACKEND": "gmalglib"})
    assert out["info"]["name"] == "gmalglib" and out["sign"] is True  # type: ignore[index]
    out = _probe(tmp_path, {"XC_SM2_BACKEND": "no-such-lib"})
    assert out["info"]["name"] is None and "unknown SM2 backend" in str(out["sign"])  # type: ignore[index]


def test_set_sm2_backend_keeps_the_current_one_on_failure() -> None:
    before = sm.sm2_backend_info()["name"]
    with pytest.raises(ImportError):
        sm.set_sm2_backend("no-such-lib")
    assert sm.sm2_backend_info()["name"] == before


def test_a_key_outlives_a_backend_switch() -> None:
    """Keys cache the backend's handle; after a switch they rebuild it instead of passing a stale one."""
    key = sm.SM2PrivateKey.generate()
    prev = sm.set_sm2_backend("openssl")
    try:
        sig = key.sign(b"x")
        ct = key.public_key.encrypt(b"secret")
        for name in BACKEND_NAMES:
            sm.set_sm2_backend(name)
            assert key.public_key.verify(b"x", sig) and key.decrypt(ct) == b"secret"
            assert key.public_key.verify(b"x", key.sign(b"x"))
    finally:
        sm.set_sm2_backend(prev or "auto")


def test_no_sm2_backend_is_a_clear_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm2_module, "_sm2", None)  # the backend chosen at import lives in primitives.sm2
    with pytest.raises(CryptoUnavailable) as err:
        sm.SM2PrivateKey.generate()
    assert err.value.status == 503


@pytest.mark.parametrize("where", ["c3", "c2", "c1"])
@pytest.mark.usefixtures("sm2_backend")
def test_backend_itself_checks_c3(where: str) -> None:
    """Each backend refuses a tampered ciphertext on its own (the adapter checks only encodings and
    that C1 is on the curve; C3 = SM3(x2 || M || y2) is the backend's check)."""
    info = sm.sm2_backend_info()
    b = load_backend(str(info["name"]))
    key = sm.SM2PrivateKey.generate()
    raw = bytearray(key.public_key.encrypt(b"attack at dawn", fmt="c1c3c2"))
    pos = {"c3": 65 + 5, "c2": 65 + 32 + 3, "c1": 1 + 31}[where]
    raw[pos] ^= 0x01
    handle = b.load_private(key.to_bytes(), key.public_key.to_bytes())
    data = bytes(raw) if b.native_ct == "c1c3c2" else sm.ct_c1c3c2_to_der(bytes(raw))
    with pytest.raises(DecryptionFailed):
        b.decrypt(handle, data)


@pytest.mark.usefixtures("sm2_backend")
def test_openssl_cli_interop_both_ways(tmp_path: Path) -> None:
    """OpenSSL's own tool: its signature (with Z for a user id) verifies here, its ciphertext decrypts
    here, ours decrypts there. (Ours verifying there: test_sm.py.)"""
    if not shutil.which("openssl"):
        pytest.skip("no openssl binary")

    def ossl(*args: str, data: bytes | None = None) -> bytes:
        r = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout

    k, pub = tmp_path / "k.pem", tmp_path / "pub.pem"
    ossl("genpkey", "-algorithm", "SM2", "-out", str(k))
    ossl("pkey", "-in", str(k), "-pubout", "-out", str(pub))
    der = ossl("pkey", "-in", str(k), "-outform", "DER")  # PKCS#8 > ECPrivateKey { 1, OCTET STRING d }
    at = der.index(bytes.fromhex("0201010420")) + 5
    key = sm.SM2PrivateKey.from_bytes(der[at : at + 32])
    assert key.public_key == sm.SM2PublicKey.from_pem(pub.read_text())

    msg = b"signed by openssl"
    (tmp_path / "msg").write_bytes(msg)
    sig = ossl("pkeyutl", "-sign", "-inkey", str(k), "-rawin", "-digest", "sm3", "-pkeyopt",
               "distid:alice@example.com", "-in", str(tmp_path / "msg"))
    assert key.public_key.verify(msg, sig, uid=b"alice@example.com")
    assert not key.public_key.verify(msg, sig)  # other user id, other Z

    ct = ossl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(pub), data=b"from openssl")
    assert key.decrypt(ct) == b"from openssl"
    ours = key.public_key.encrypt(b"to openssl")
    assert ossl("pkeyutl", "-decrypt", "-inkey", str(k), data=ours) == b"to openssl"


@pytest.mark.usefixtures("sm2_backend")
def test_threads_share_keys() -> None:
    """Key objects (and their backend handles) are shared by threads: the http workers' pool does that."""
    key = sm.SM2PrivateKey.generate()
    pub = key.public_key
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(60):
                msg = f"{i}-{j}".encode()
                assert pub.verify(msg, key.sign(msg))
                assert key.decrypt(pub.encrypt(msg)) == msg
        except BaseException as exc:  # collected, re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_openssl_backend_leaves_no_error_queue_behind() -> None:
    """A bad signature or ciphertext must not leave entries in OpenSSL's per-thread error queue (they
    would pile up, and the next unrelated OpenSSL user in this thread would read them)."""
    import ctypes

    b = load_backend("openssl")
    lib = b._lib  # type: ignore[attr-defined]
    lib.ERR_peek_error.restype = ctypes.c_ulong
    key = sm.SM2PrivateKey.generate()
    h = b.load_private(key.to_bytes(), key.public_key.to_bytes())
    pub = b.load_public(key.public_key.to_bytes())
    e = os.urandom(32)
    other = sm.sig_raw_to_der(sm.SM2PrivateKey.generate().sign(b"x", fmt="raw"))
    assert b.verify_digest(pub, e, other) is False
    assert lib.ERR_peek_error() == 0
    ct = bytearray(b.encrypt(pub, b"hello"))
    ct[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        b.decrypt(h, bytes(ct))
    assert lib.ERR_peek_error() == 0
