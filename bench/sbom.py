"""SBOM generation of the installed environment: `xcstack sbom` vs `cyclonedx-py environment`, one run.

Both run as fresh processes against the same interpreter (.venv), both validate their output against the
CycloneDX 1.6 schema before writing. xcstack additionally writes SPDX 2.3 in the "both" row. Information
is compared by counting components (nested included), components with supplier / hashes / license,
dependency entries, and leaf fields of the whole document.

cyclonedx-bom is installed into its own venv under .bench/ (not into .venv) if it is missing.
Env: XC_BENCH_REPEAT=N runs each N times (default 1) and reports the best.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from _report import table, write_section  # noqa: E402
from xcstack.supply.cyclonedx import summary  # noqa: E402

VENV_PY = ROOT / ".venv" / "bin" / "python"
PEER_VENV = ROOT / ".bench" / "cdx"
PEER = PEER_VENV / "bin" / "cyclonedx-py"


def ensure_peer() -> str:
    if not PEER.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", "cyclonedx-bom"], check=True)
    out = subprocess.run([str(PEER), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dt


def leaves(v: Any) -> int:
    if isinstance(v, dict):
        return sum(leaves(x) for x in v.values())
    if isinstance(v, list):
        return sum(leaves(x) for x in v)
    return 1


def main() -> None:
    repeat = max(1, int(os.environ.get("XC_BENCH_REPEAT", "1")))
    peer_version = ensure_peer()
    xcstack = str(ROOT / ".venv" / "bin" / "xcstack")
    with tempfile.TemporaryDirectory(prefix="xc-bench-sbom-") as tmp:
        t = Path(tmp)
        env = {**os.environ, "XC_DATA_DIR": str(t / "data")}
        runs: dict[str, list[float]] = {"peer": [], "ours_cdx": [], "ours_both": []}
        for _ in range(repeat):
            runs["peer"].append(timed([str(PEER), "environment", "--sv", "1.6", "--of", "JSON", "--validate",
                                       "-o", str(t / "peer.json"), str(VENV_PY)]))
            runs["ours_cdx"].append(timed([xcstack, "sbom", "--format", "cyclonedx", "-o", str(t / "ours.cdx.json")],
                                          env))
            runs["ours_both"].append(timed([xcstack, "sbom", "--format", "both", "-o", str(t / "both")], env))
        peer_doc = json.loads((t / "peer.json").read_text())
        ours_doc = json.loads((t / "ours.cdx.json").read_text())
        peer_s, ours_s = summary(peer_doc), summary(ours_doc)
        peer_t, cdx_t, both_t = min(runs["peer"]), min(runs["ours_cdx"]), min(runs["ours_both"])

    def row(name: str, secs: float, s: dict[str, int], doc: dict[str, Any]) -> list[object]:
        meta = doc.get("metadata", {})
        return [name, f"{secs:.2f}", f"{secs / peer_t:.2f}x", s["components"], s["with_supplier"], s["with_hashes"],
                s["with_license"], s["dependencies"], leaves(doc), "yes" if meta.get("authors") else "no"]

    headers = ["generator", "wall s", "vs peer", "components", "with supplier", "with hashes", "with license",
               "dependency entries", "leaf fields", "SBOM author"]
    rows = [
        row(f"cyclonedx-py environment ({peer_version})", peer_t, peer_s, peer_doc),
        row("xcstack sbom --format cyclonedx", cdx_t, ours_s, ours_doc),
        row("xcstack sbom --format both (+SPDX 2.3)", both_t, ours_s, ours_doc),
    ]
    more = all(ours_s[k] >= peer_s[k] for k in ("components", "with_supplier", "with_hashes", "dependencies"))
    verdict = (f"Target ≤ 0.5x the peer's time with strictly more information: CycloneDX {cdx_t / peer_t:.2f}x, "
               f"both formats {both_t / peer_t:.2f}x; more information: {'yes' if more else 'NO'}.")
    body = "\n".join([
        "## SBOM generation (supply)",
        "",
        "Installed environment (.venv), each generator as a fresh process, each validating its CycloneDX 1.6 "
        f"output before writing; best of {repeat} run(s). xcstack's count includes the native libraries loaded "
        "by a process that imported the server's native modules, the OS packages owning them, the interpreter, "
        "OS and platform; its component hash per distribution is dirhash-h1 over RECORD.",
        "",
        table(headers, rows),
        "",
        verdict,
        "",
        "Where the peer's time goes (profiled here): jsonschema's `iri-reference` format check through "
        "rfc3987-syntax's Earley parser, ~0.1 s per URL; xcstack validates against the same strict schema "
        "(cyclonedx-python-lib's JsonStrictValidator schema + registry) with an RFC 3987 §3.1 IRI→URI mapping "
        "checked by rfc3986-validator, and a linear uniqueItems check. Figures from a shared 2-core machine.",
    ])  # fmt: skip
    print(body)
    write_section("sbom", "python bench/sbom.py", body)


if __name__ == "__main__":
    main()
