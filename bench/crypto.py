"""Crypto benchmark: xcstack's 国密 adapters vs `openssl speed`, and the HSM owner vs direct PKCS#11.

Part 1 (one run, same machine, wall-clock for both sides: `openssl speed -elapsed`):
  SM2 sign/verify (adapter with cached Z: SM3(Z||M) + gmssl-pyx) vs `openssl speed sm2`;
  SM3 MB/s and SM4 MB/s at 16 KiB vs `openssl speed -evp sm3 / sm4-cbc / sm4-ctr`
  (Debian's OpenSSL 3.0 has no SM4-GCM: our GCM is compared with its CBC and CTR).
Part 2: 4 client processes -> HSM owner -> SoftHSM2 ECDSA-P256 sign, vs one process calling the
  same PKCS#11 backend directly; plus unloaded p50 latency (1 call in flight) of both.

Targets (issue 7): SM3/SM4 >= 0.8x openssl; SM2 sign >= 1.0x openssl; owner >= 0.8x direct with
added p50 < 200 us.

    .venv/bin/python bench/crypto.py [--seconds 2] [--clients 4] [--inflight 8] [--no-owner]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench._report import table, write_section  # noqa: E402

from xcstack.crypto import sm  # noqa: E402

BLOCK = 16384


def timed(fn: Any, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(16):
            fn()
        n += 16
        now = time.perf_counter()
        if now >= end:
            return n, now - t0


def openssl_speed(args: list[str], seconds: int) -> str:
    if not shutil.which("openssl"):
        return ""
    r = subprocess.run(
        ["openssl", "speed", "-elapsed", "-seconds", str(seconds), *args],
        capture_output=True, text=True, timeout=seconds * 10 + 60,
    )
    return r.stdout + r.stderr


def openssl_mbps(alg: str, seconds: int) -> float | None:
    out = openssl_speed(["-mr", "-bytes", str(BLOCK), "-evp", alg], seconds)
    m = re.search(r"^\+F:\d+:[^:]+:([0-9.]+)", out, re.M)
    return float(m.group(1)) / 1e6 if m else None


def openssl_sm2(seconds: int) -> tuple[float, float] | None:
    out = openssl_speed(["sm2"], seconds)
    m = re.search(r"SM2 \(CurveSM2\)\s+[0-9.]+s\s+[0-9.]+s\s+([0-9.]+)\s+([0-9.]+)", out)
    return (float(m.group(1)), float(m.group(2))) if m else None


def ratio(ours: float, peer: float | None) -> str:
    return f"{ours / peer:.2f}x" if peer else "n/a"


def part_algorithms(seconds: float) -> str:
    osec = max(1, round(seconds))
    key = sm.SM2PrivateKey.generate()
    pub = key.public_key
    msg = os.urandom(32)
    sig = key.sign(msg)
    n, dt = timed(lambda: key.sign(msg), seconds)
    sign_s = n / dt
    n, dt = timed(lambda: pub.verify(msg, sig), seconds)
    verify_s = n / dt
    ossl_sm2 = openssl_sm2(osec)

    data = os.urandom(BLOCK)
    k16, iv, nonce = os.urandom(16), os.urandom(16), os.urandom(12)
    n, dt = timed(lambda: sm.sm3(data), seconds)
    sm3_mbps = n * BLOCK / dt / 1e6
    n, dt = timed(lambda: sm.sm4_gcm_encrypt(k16, nonce, data), seconds)
    gcm_mbps = n * BLOCK / dt / 1e6
    n, dt = timed(lambda: sm.sm4_cbc_encrypt(k16, iv, data, padding=False), seconds)
    cbc_mbps = n * BLOCK / dt / 1e6
    n, dt = timed(lambda: sm.sm4_ctr(k16, iv, data), seconds)
    ctr_mbps = n * BLOCK / dt / 1e6
    o_sm3, o_cbc, o_ctr = openssl_mbps("sm3", osec), openssl_mbps("sm4-cbc", osec), openssl_mbps("sm4-ctr", osec)

    def f(v: float | None, unit: str = "") -> str:
        return f"{v:,.0f}{unit}" if v is not None else "n/a"

    rows = [
        ["SM2 sign (cached Z, 32 B msg)", f(sign_s, "/s"), f(ossl_sm2[0] if ossl_sm2 else None, "/s"),
         ratio(sign_s, ossl_sm2[0] if ossl_sm2 else None), ">= 1.0x"],
        ["SM2 verify", f(verify_s, "/s"), f(ossl_sm2[1] if ossl_sm2 else None, "/s"),
         ratio(verify_s, ossl_sm2[1] if ossl_sm2 else None), "-"],
        ["SM3 (16 KiB)", f(sm3_mbps, " MB/s"), f(o_sm3, " MB/s"), ratio(sm3_mbps, o_sm3), ">= 0.8x"],
        ["SM4-GCM encrypt (16 KiB) vs openssl SM4-CBC", f(gcm_mbps, " MB/s"), f(o_cbc, " MB/s"),
         ratio(gcm_mbps, o_cbc), ">= 0.8x"],
        ["SM4-GCM encrypt (16 KiB) vs openssl SM4-CTR", f(gcm_mbps, " MB/s"), f(o_ctr, " MB/s"),
         ratio(gcm_mbps, o_ctr), "-"],
        ["SM4-CBC encrypt (16 KiB)", f(cbc_mbps, " MB/s"), f(o_cbc, " MB/s"), ratio(cbc_mbps, o_cbc), ">= 0.8x"],
        ["SM4-CTR (16 KiB)", f(ctr_mbps, " MB/s"), f(o_ctr, " MB/s"), ratio(ctr_mbps, o_ctr), "-"],
    ]
    return table(["operation", "xcstack adapter", "openssl speed -elapsed", "ratio", "target"], rows)


# ---------------------------------------------------------------------------------------------
# Part 2: HSM owner vs direct PKCS#11 (SoftHSM2)
# ---------------------------------------------------------------------------------------------
def _softhsm(tmp: Path) -> tuple[str, dict[str, str]] | None:
    libs = [p for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
            if os.path.exists(p)]
    if not libs or not shutil.which("softhsm2-util"):
        return None
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "xcstack", "--pin", "123456", "--so-pin", "654321"],
        check=True, capture_output=True, env={**os.environ, **env},
    )
    return libs[0], env


def _settings_env(data_dir: Path, lib: str) -> dict[str, str]:
    return {
        "XC_DATA_DIR": str(data_dir), "XC_CRYPTO__BACKEND": "pkcs11", "XC_CRYPTO__ACCESS": "owner",
        "XC_CRYPTO__PKCS11__LIBRARY": lib, "XC_CRYPTO__PKCS11__PIN": "123456",
        "XC_OBSERVABILITY__LOG_LEVEL": "WARNING",
    }


def _client_proc(sock: str, seconds: float, inflight: int, q: Any, start_at: float) -> None:
    from xcstack.config import load_settings
    from xcstack.crypto.client import OwnerClient

    async def main() -> tuple[int, list[float]]:
        c = OwnerClient(sock, load_settings().crypto)
        await c.sign("bench", b"warm-up")
        await asyncio.sleep(max(0.0, start_at - time.time()))  # all clients start together
        end = time.perf_counter() + seconds
        lat: list[float] = []
        count = 0

        async def worker() -> None:
            nonlocal count
            data = os.urandom(32)
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await c.sign("bench", data)
                lat.append(time.perf_counter() - t0)
                count += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        await c.close()
        return count, lat

    q.put(_run(main()))


def _run(coro: Any) -> Any:
    """Clients run the loop the http workers run (uvloop where installed)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _latency_proc(sock: str, n: int, q: Any) -> None:
    from xcstack.config import load_settings
    from xcstack.crypto.client import OwnerClient

    async def main() -> list[float]:
        c = OwnerClient(sock, load_settings().crypto)
        data = os.urandom(32)
        for _ in range(50):
            await c.sign("bench", data)
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.sign("bench", data)
            lat.append(time.perf_counter() - t0)
        await c.close()
        return lat

    q.put(_run(main()))


def part_owner(seconds: float, clients: int, inflight: int) -> str:
    with tempfile.TemporaryDirectory(prefix="xc-bench-crypto-") as d:
        tmp = Path(d)
        hsm = _softhsm(tmp)
        if hsm is None:
            return "_SoftHSM2 not installed (scripts/services/crypto.sh): owner benchmark skipped._"
        lib, hsm_env = hsm
        data_dir = tmp / "data"
        env = {**hsm_env, **_settings_env(data_dir, lib)}
        os.environ.update(env)
        from xcstack.config import load_settings
        from xcstack.crypto.owner import build_service, socket_path

        settings = load_settings()

        # direct: this process, the same backend code the owner runs
        async def direct() -> tuple[float, list[float]]:
            svc = await build_service(settings)
            rec = await svc.create_key("bench", "sm2")
            data = os.urandom(32)
            for _ in range(50):
                svc.backend.sign(rec, data, b"1234567812345678")
            lat: list[float] = []
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                t1 = time.perf_counter()
                svc.backend.sign(rec, data, b"1234567812345678")
                lat.append(time.perf_counter() - t1)
            rate = len(lat) / (time.perf_counter() - t0)
            svc.close()
            await svc.keystore.store.close()
            return rate, lat

        direct_rate, direct_lat = asyncio.run(direct())

        sock = socket_path(settings)
        owner = subprocess.Popen([sys.executable, "-m", "xcstack.crypto.owner"], env={**os.environ, **env})
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if owner.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("HSM owner did not start")
                time.sleep(0.05)
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_latency_proc, args=(str(sock), 2000, q))
            p.start()
            owner_lat1: list[float] = q.get(timeout=120)
            p.join()
            start_at = time.time() + 2.0
            procs = [ctx.Process(target=_client_proc, args=(str(sock), seconds, inflight, q, start_at))
                     for _ in range(clients)]
            for p in procs:
                p.start()
            results = [q.get(timeout=seconds * 10 + 120) for _ in procs]
            for p in procs:
                p.join()
        finally:
            owner.terminate()
            owner.wait(10)
        total = sum(r[0] for r in results)
        owner_rate = total / seconds
        loaded = sorted(x for r in results for x in r[1])
        p50_direct = statistics.median(direct_lat) * 1e6
        p50_owner1 = statistics.median(owner_lat1) * 1e6
        p99_owner1 = sorted(owner_lat1)[int(len(owner_lat1) * 0.99)] * 1e6
        rows = [
            ["direct: 1 process, PKCS#11 backend in-process", f"{direct_rate:,.0f}", "1.00x", f"{p50_direct:.0f}", "-"],
            [f"owner: {clients} client processes x {inflight} in flight", f"{owner_rate:,.0f}",
             f"{owner_rate / direct_rate:.2f}x", f"{statistics.median(loaded) * 1e6:.0f} (loaded)", ">= 0.8x"],
            ["owner: 1 client, 1 in flight (unloaded latency)", f"{1 / statistics.mean(owner_lat1):,.0f}", "-",
             f"{p50_owner1:.0f} (p99 {p99_owner1:.0f})", f"added p50 {p50_owner1 - p50_direct:.0f} us (< 200)"],
        ]
        return table(["path (SoftHSM2 ECDSA-P256 sign)", "signs/s", "vs direct", "p50 us", "target"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("XC_BENCH_SECONDS", "2")))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=8)
    ap.add_argument("--no-owner", action="store_true")
    ap.add_argument("--no-algorithms", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    algo = "" if args.no_algorithms else part_algorithms(args.seconds)
    print(algo)
    owner = "" if args.no_owner else part_owner(args.seconds, args.clients, args.inflight)
    print(owner)
    body = (
        "### 国密 adapters vs openssl speed, HSM owner vs direct PKCS#11\n\n"
        "Shared 2-core machine: numbers are noisy; read the ratios (both sides ran in the same run; "
        "openssl with `-elapsed`, i.e. wall-clock like ours). Debian's OpenSSL 3.0 has no SM4-GCM, so "
        "SM4-GCM is compared with its SM4-CBC/CTR.\n\n" + algo + "\n\n" + owner
    )
    if not args.no_write:
        write_section("crypto", "python bench/crypto.py", body)


if __name__ == "__main__":
    main()
