"""Trusted boot (可信验证): a signed manifest of SM3 hashes of what xcstack runs.

`xcstack trust seal` hashes
- the installed xcstack code (every file of the `xcstack` package but `__pycache__`),
- the config file in use (`--config` / `XC_CONFIG`) and `[security] trust_paths` (files or dirs),
- the model repository (`[inference] model_repository`, default `<data_dir>/models`), when present,
and writes `<data_dir>/trust/manifest.json` signed with SM2 (key `[security] signing_key`, through
the crypto capability). `verify_or_refuse(settings)` runs in the supervisor before anything starts:
on any mismatch (changed, missing or unexpected file, bad signature) it writes an audit record and
exits non-zero with a message naming the file. `TrustMonitor` re-verifies periodically inside the
server and alarms through the log, a metric and the audit log.

The manifest's signature is checked with public keys only (the keystore or the local key), so the
supervisor can verify before the HSM owner runs. An attacker who can rewrite both the manifest and
the keystore / key file defeats this check; keep data_dir writable by the service user only and
prefer a PKCS#11/SDF device, whose key cannot be replaced by writing files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from xcstack.crypto.recipes import SM3
from xcstack.security.audit import record as rec
from xcstack.security.audit.log import AuditLog
from xcstack.security.signing import Signer

if TYPE_CHECKING:
    from xcstack.config import Settings

log = logging.getLogger("xcstack.security.trust")

TRUST_OK = Gauge("xc_trust_verified", "1 when the last trusted-boot verification passed, else 0",
                 multiprocess_mode="liveall")
TRUST_FAILURES = Counter("xc_trust_failures_total", "Trusted-boot verifications that found a mismatch")

SigVerify = Callable[[str, bytes, bytes], Awaitable[bool]]
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")


class TrustViolation(SystemExit):
    """Raised by `verify_or_refuse`: the process exits non-zero with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class TrustReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    files: int = 0

    @property
    def first(self) -> str:
        return self.problems[0] if self.problems else ""


def manifest_path(settings: Settings) -> Path:
    return settings.security.trust_manifest or settings.data_dir / "trust" / "manifest.json"


def code_root() -> Path:
    import xcstack

    return Path(xcstack.__file__).resolve().parent


def sealed_roots(settings: Settings, config_path: str | Path | None = None) -> list[Path]:
    roots = [code_root()]
    cfg = config_path or os.environ.get("XC_CONFIG")
    if cfg:
        roots.append(Path(cfg).resolve())
    roots += [Path(p).resolve() for p in settings.security.trust_paths]
    models = settings.inference.repository_dir(settings.data_dir)
    if models.is_dir():
        roots.append(models.resolve())
    return roots


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if not f.endswith(SKIP_SUFFIXES):
                out.append(Path(dirpath) / f)
    return out


def hash_file(path: Path) -> str:
    h = SM3()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def collect(roots: list[Path]) -> dict[str, str]:
    files: dict[str, str] = {}
    for root in roots:
        for p in _walk(root):
            files[str(p)] = hash_file(p)
    return files


def _unsigned(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "sig"}
    return b"xcstack-trust-manifest-v1\0" + rec.canonical(body)


async def seal(settings: Settings, signer: Signer, config_path: str | Path | None = None) -> dict[str, Any]:
    roots = sealed_roots(settings, config_path)
    files = await asyncio.to_thread(collect, roots)
    manifest: dict[str, Any] = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "key_id": signer.key_id,
        "roots": [str(r) for r in roots],
        "files": files,
    }
    manifest["sig"] = (await signer.sign(_unsigned(manifest))).hex()
    path = manifest_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return manifest


async def verify(settings: Settings, sig_verify: SigVerify) -> TrustReport:
    path = manifest_path(settings)
    if not path.exists():
        return TrustReport(False, [f"{path}: no trusted-boot manifest (run `xcstack trust seal`)"])
    try:
        manifest = json.loads(path.read_bytes())
        sig = bytes.fromhex(manifest["sig"])
        files: dict[str, str] = manifest["files"]
        roots = [Path(r) for r in manifest["roots"]]
    except (ValueError, KeyError, TypeError) as exc:
        return TrustReport(False, [f"{path}: malformed manifest ({exc})"])
    key_id = str(manifest.get("key_id"))
    try:
        good = await sig_verify(key_id, _unsigned(manifest), sig)
    except LookupError:
        return TrustReport(False, [f"{path}: no trusted public key for key id {key_id!r}"])
    if not good:
        return TrustReport(False, [f"{path}: manifest signature is invalid (manifest altered or not signed "
                                   "by the trusted key)"])
    current = await asyncio.to_thread(collect, [r for r in roots if r.exists()])
    problems: list[str] = []
    for name, digest in sorted(files.items()):
        got = current.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif got != digest:
            problems.append(f"{name}: modified (SM3 {got[:16]}… expected {digest[:16]}…)")
    for name in sorted(set(current) - set(files)):
        problems.append(f"{name}: not in the manifest (unexpected file)")
    return TrustReport(not problems, problems, len(files))


async def _audit_blocking_free(settings: Settings, audit: AuditLog | None, report: TrustReport, phase: str) -> None:
    if audit is None:
        return
    await audit.append(actor="system", action="trust.verify", resource="trust:manifest",
                       outcome="success" if report.ok else "failure",
                       detail={"phase": phase, "files": report.files, "problems": report.problems[:20]})


def verify_or_refuse(settings: Settings) -> None:
    """Called by the supervisor before it starts anything. Returns when the installation matches its
    manifest (or when there is no manifest and `[security] trust_required` is false); otherwise
    audits the failure and raises `TrustViolation` (SystemExit, non-zero) naming the first file."""

    async def run() -> None:
        from xcstack.security.keys import KeyVerifier, offline_signer

        path = manifest_path(settings)
        if not path.exists() and not settings.security.trust_required:
            log.warning("no trusted-boot manifest at %s; run `xcstack trust seal` (trust_required = false)", path)
            return
        report = await verify(settings, KeyVerifier(settings))
        TRUST_OK.set(1 if report.ok else 0)
        if report.ok:
            log.info("trusted boot: %d files match the signed manifest", report.files)
            return
        TRUST_FAILURES.inc()
        audit_dir = settings.security.audit.dir or settings.data_dir / "audit"
        signer_cm = offline_signer(settings)
        try:
            signer = await signer_cm.__aenter__()
        except Exception:
            signer = None
        audit = AuditLog(Path(audit_dir), settings.security.audit, signer=signer)
        try:
            await audit.open()
            await _audit_blocking_free(settings, audit, report, "boot")
            await audit.close()
        finally:
            if signer is not None:
                with contextlib.suppress(Exception):
                    await signer_cm.__aexit__(None, None, None)
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise TrustViolation(f"xcstack: trusted boot failed, refusing to start: {report.first}{more}")

    asyncio.run(run())


class TrustMonitor:
    """Periodic re-verification inside a running worker: log + metric + audit on mismatch."""

    def __init__(self, settings: Settings, audit: AuditLog | None, signer: Signer | None) -> None:
        self.settings = settings
        self.audit = audit
        self.signer = signer
        self.enabled = manifest_path(settings).exists()
        self.last: TrustReport | None = None

    async def check(self) -> TrustReport:
        from xcstack.security.keys import KeyVerifier

        verifier = KeyVerifier(self.settings)
        signer = self.signer

        async def sig_verify(key_id: str, msg: bytes, sig: bytes) -> bool:
            if signer is not None and key_id == signer.key_id and await signer.verify(msg, sig):
                return True
            return await verifier(key_id, msg, sig)

        report = await verify(self.settings, sig_verify)
        TRUST_OK.set(1 if report.ok else 0)
        if not report.ok:
            TRUST_FAILURES.inc()
            log.error("trusted-boot re-verification FAILED: %s", "; ".join(report.problems[:5]))
            await _audit_blocking_free(self.settings, self.audit, report, "runtime")
        self.last = report
        return report

    def _my_turn(self) -> bool:
        """Several workers run a monitor; one verification per interval is enough. A stamp file
        (updated under flock) says when the last one ran."""
        import fcntl

        stamp = manifest_path(self.settings).with_name(".last-verify")
        interval = self.settings.security.trust_interval_s
        try:
            fd = os.open(stamp, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if time.time() - os.fstat(fd).st_mtime < interval * 0.9 and os.fstat(fd).st_size:
                return False
            os.pwrite(fd, b"x", 0)
            os.utime(fd)
            return True
        finally:
            os.close(fd)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.security.trust_interval_s)
            try:
                if not await asyncio.to_thread(self._my_turn):
                    continue
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("trusted-boot re-verification could not run: %s", exc)
