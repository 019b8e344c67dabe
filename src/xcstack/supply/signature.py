"""SM2 signatures over written SBOM documents (`xcstack sbom --sign`, `--verify-signature`).

The signature file lists each document with its SM3 and SHA-256 digests and size, and is signed with
SM2 by the deployment's signing key (`[security] signing_key`, the same key as the audit checkpoints and
the trusted-boot manifest; through the HSM owner when it runs, else the soft backend in process). The
signed bytes are the canonical JSON of the file without its `sig` field (sorted keys, compact UTF-8).
Verification needs only public keys (the keystore), as for the trusted-boot manifest.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xcstack.crypto.recipes import SM3
from xcstack.supply.errors import SupplyError

FORMAT = "xcstack-sbom-signature/1"


def digests(path: Path) -> dict[str, Any]:
    sha, sm, size = hashlib.sha256(), SM3(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            sm.update(chunk)
            size += len(chunk)
    return {"sm3": sm.hexdigest(), "sha256": sha.hexdigest(), "size": size}


def unsigned(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(settings: Any, paths: list[Path]) -> dict[str, Any]:
    """The unsigned manifest for `paths` (all in one directory)."""
    base = paths[0].parent
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "algorithm": "SM2 signature with SM3 (GB/T 32918, uid " + settings.crypto.default_uid + ")",
        "files": {str(p.relative_to(base)): digests(p) for p in paths},
    }


async def sign_manifest(settings: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    from xcstack.security.keys import offline_signer

    try:
        async with offline_signer(settings) as signer:
            manifest["key_id"] = signer.key_id
            manifest["sig"] = (await signer.sign(unsigned(manifest))).hex()
    except Exception as exc:  # no key, no HSM owner for a device backend, ...
        raise SupplyError(f"cannot sign: {exc}") from None
    return manifest


def load_manifest(sig_path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(sig_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SupplyError(f"{sig_path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SupplyError(f"{sig_path}: not an xcstack SBOM signature file")
    return manifest


def check_files(sig_path: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the listed documents (missing, or digests that differ)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{sig_path}: lists no files"]
    problems: list[str] = []
    for name, want in files.items():
        path = sig_path.parent / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        got = digests(path)
        if not isinstance(want, dict) or got["sm3"] != want.get("sm3") or got["sha256"] != want.get("sha256"):
            problems.append(f"{path}: modified since it was signed (SM3 now {got['sm3'][:16]}...)")
    return problems


async def check_signature(settings: Any, manifest: dict[str, Any]) -> bool:
    from xcstack.security.keys import KeyVerifier

    try:
        sig = bytes.fromhex(str(manifest.get("sig", "")))
    except ValueError:
        return False
    return bool(sig) and await KeyVerifier(settings)(str(manifest.get("key_id")), unsigned(manifest), sig)
