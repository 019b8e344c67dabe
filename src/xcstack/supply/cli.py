"""`xcstack sbom`: SBOM of the running installation (CycloneDX 1.6 / SPDX 2.3), offline audit.

    xcstack sbom                              # both formats into <data_dir>/sbom/
    xcstack sbom --format cyclonedx -o -      # CycloneDX to stdout
    xcstack sbom --pid 1234                   # libraries loaded by a running worker
    xcstack sbom --audit /srv/osv             # generate, then audit (no files written unless -o)
    xcstack sbom --sbom other.cdx.json --audit /srv/osv.zip --severity critical
    xcstack sbom --diff /var/lib/xcstack/sbom/baseline.cdx.json   # what changed since the baseline
    xcstack sbom --sign && xcstack sbom --verify-signature var/sbom/xcstack.sbom.sig.json   # SM2

Exit status: 0 ok; 1 the audit found a vulnerability at/above the threshold or a license violation,
or --diff found a change;
2 bad input (config, unreadable advisories, a document that fails schema validation: nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xcstack.config import load_settings
from xcstack.supply.errors import SupplyError

FORMATS = ("cyclonedx", "spdx", "both")
_FROM_CONFIG = Path("\0from-config")
FILENAMES = {"cyclonedx": "xcstack.cdx.json", "spdx": "xcstack.spdx.json"}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("sbom", help="SBOM of this installation (CycloneDX/SPDX), offline audit",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=FORMATS, default="both")
    p.add_argument("-o", "--output", default=None,
                   help="file for one format ('-' = stdout), directory for both; default <data_dir>/sbom")
    p.add_argument("--pid", action="append", default=None, metavar="PID|auto",
                   help="read loaded libraries from this process (repeatable); 'auto': every process of the "
                        "running xcstack (supervisor, http/model workers, HSM owner); default: this process "
                        "after importing the server's native modules")
    p.add_argument("--no-native", action="store_true", help="leave out loaded native libraries")
    p.add_argument("--files", action="store_true", default=None, help="embed every installed file's SHA-256")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="override data_dir (models are then read from <DIR>/models); default: [inference] "
                        "model_repository, else <data_dir>/models")
    p.add_argument("--sbom", dest="sbom_in", type=Path, default=None,
                   help="audit this CycloneDX JSON instead of generating one")
    p.add_argument("--audit", type=Path, nargs="?", const=_FROM_CONFIG, default=None, metavar="DIR_OR_ZIP",
                   help="offline OSV export (osv-scanner layout <ecosystem>/all.zip, or any dir/zip of OSV JSON); "
                        "without a value: [supply] advisories")
    p.add_argument("--severity", choices=("low", "medium", "high", "critical"), default=None,
                   help="fail at or above this severity (default [supply] severity_threshold)")
    p.add_argument("--ignore", action="append", default=[], metavar="ID", help="accepted advisory id (repeatable)")
    p.add_argument("--license-allow", action="append", default=None, metavar="SPDX", help="allowed license/glob")
    p.add_argument("--license-deny", action="append", default=None, metavar="SPDX", help="denied license/glob")
    p.add_argument("--unknown-license", choices=("allow", "warn", "deny"), default=None)
    p.add_argument("--diff", type=Path, default=None, metavar="OLD.cdx.json",
                   help="compare with an earlier CycloneDX SBOM; exit 1 when anything changed")
    p.add_argument("--report", type=Path, default=None, help="write the audit (or diff) report as JSON here")
    p.add_argument("--sign", action="store_true",
                   help="sign the written documents with SM2 ([security] signing_key): writes *.sig.json")
    p.add_argument("--verify-signature", type=Path, default=None, metavar="SIG.json",
                   help="check a signature file and the documents it lists; exit 1 if anything is wrong")
    p.add_argument("--timings", action="store_true", help="print where the time went (stderr)")
    p.set_defaults(func=run)


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("xcstack")
    except Exception:
        return "0"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(settings: Any, *, fmt: str = "both", pids: list[int] | None = None, native: bool = True,
             include_files: bool = False, data_dir: Path | None = None,
             timings: dict[str, float] | None = None) -> dict[str, str]:
    """Collect, build and validate; returns {format: JSON text}. Raises SbomValidationError."""
    from xcstack.supply import cyclonedx as cdx
    from xcstack.supply import spdx
    from xcstack.supply.inventory import collect
    from xcstack.supply.validate import validate_cyclonedx, validate_spdx

    sup = settings.supply
    t0 = time.perf_counter()
    repo = getattr(getattr(settings, "inference", None), "model_repository", None)
    models_dir = repo if (repo is not None and data_dir is None) else None
    inv = collect(data_dir=data_dir if data_dir is not None else settings.data_dir, models_dir=models_dir,
                  pids=pids, native=native,
                  native_modules=sup.native_modules, author=sup.author, os_timeout=sup.os_query_timeout_s)
    for w in inv.warnings:
        print(f"xcstack sbom: note: {w}", file=sys.stderr)
    t1 = time.perf_counter()
    out: dict[str, str] = {}
    version = _tool_version()
    if fmt in ("cyclonedx", "both"):
        doc = cdx.document(inv, supplier=sup.supplier, supplier_url=sup.supplier_url, include_files=include_files,
                           tool_version=version)
        t2 = time.perf_counter()
        validate_cyclonedx(doc)
        out["cyclonedx"] = json.dumps(doc, indent=2, ensure_ascii=False)
        if timings is not None:
            timings["cyclonedx_build_s"] = t2 - t1
            timings["cyclonedx_validate_s"] = time.perf_counter() - t2
    if fmt in ("spdx", "both"):
        t3 = time.perf_counter()
        sdoc = spdx.build_document(inv, supplier=sup.supplier, tool_version=version)
        validate_spdx(sdoc)
        out["spdx"] = spdx.to_json(sdoc)
        if timings is not None:
            timings["spdx_s"] = time.perf_counter() - t3
    if timings is not None:
        timings.update({f"collect.{k}": v for k, v in inv.timings.items()})
        timings["collect_s"] = t1 - t0
        timings["total_s"] = time.perf_counter() - t0
    return out


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    sup = settings.supply
    if args.audit == _FROM_CONFIG:
        if sup.advisories is None:
            print("xcstack sbom: --audit without a path needs [supply] advisories", file=sys.stderr)
            return 2
        args.audit = sup.advisories
    timings: dict[str, float] = {}
    if args.verify_signature is not None:
        return _verify_signature(args.verify_signature, settings)
    if args.sign and args.output == "-":
        print("xcstack sbom: --sign needs files (not -o -)", file=sys.stderr)
        return 2
    try:
        if args.sbom_in is not None:
            policy = bool(args.license_allow or args.license_deny or sup.license_allow or sup.license_deny)
            if args.audit is None and args.diff is None and not policy:
                print("xcstack sbom: --sbom needs --audit, --diff or a license policy", file=sys.stderr)
                return 2
            try:
                docs = {"cyclonedx": args.sbom_in.read_text(encoding="utf-8")}
                json.loads(docs["cyclonedx"])
            except (OSError, ValueError) as exc:
                print(f"xcstack sbom: {args.sbom_in}: {exc}", file=sys.stderr)
                return 2
        else:
            fmt = args.format
            if (args.audit is not None or args.diff is not None) and fmt == "spdx":
                fmt = "both"  # the audit and the diff read the CycloneDX document
            include_files = sup.include_files if args.files is None else bool(args.files)
            pids = _pids(args.pid)
            if pids == []:
                print("xcstack sbom: --pid auto: no running xcstack process found", file=sys.stderr)
                return 2
            docs = generate(settings, fmt=fmt, pids=pids, native=not args.no_native,
                            include_files=include_files, data_dir=args.data_dir, timings=timings)
            if "cyclonedx" in docs:
                _print_summary(docs["cyclonedx"])
            if args.output is not None or (args.audit is None and args.diff is None):
                written = _emit(docs, args, settings)
                if args.sign and written:
                    _sign(written, args, settings)
        if args.timings and timings:
            print("timings: " + ", ".join(f"{k}={v:.3f}s" for k, v in timings.items()), file=sys.stderr)
        if args.diff is not None:
            return _diff(docs["cyclonedx"], args)
        advisories = args.audit if args.audit is not None else None
        policy_given = bool(args.license_allow or args.license_deny or sup.license_allow or sup.license_deny)
        if advisories is None and not policy_given:
            return 0
        return _audit(docs["cyclonedx"], advisories, args, settings)
    except SupplyError as exc:
        print(f"xcstack sbom: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in _SBOM_EXTRA:
            print(f"xcstack sbom: {exc.name} is missing: install the sbom extra (pip install 'xcstack[sbom]')",
                  file=sys.stderr)
            return 2
        raise


_SBOM_EXTRA = {"cyclonedx", "spdx_tools", "jsonschema", "referencing", "license_expression", "packageurl",
               "rfc3986_validator"}


def _print_summary(cyclonedx_text: str) -> None:
    from xcstack.supply.audit import iter_components
    from xcstack.supply.cyclonedx import summary

    doc = json.loads(cyclonedx_text)
    s = summary(doc)
    loaded = sum(1 for c in iter_components(doc)
                 if any(p.get("name") == "xcstack:loaded" for p in c.get("properties", [])))
    n = s["components"]
    print(f"xcstack sbom: {n} components ({loaded} loaded native libraries); supplier {s['with_supplier']}/{n}, "
          f"hashes {s['with_hashes']}/{n}, license {s['with_license']}/{n}; {s['dependencies']} dependency entries",
          file=sys.stderr)


def _pids(values: list[str] | None) -> list[int] | None:
    """None: this process; [] : 'auto' found nothing."""
    if not values:
        return None
    from xcstack.supply.inventory import find_xcstack_pids

    out: list[int] = []
    for v in values:
        if v == "auto":
            out.extend(find_xcstack_pids())
        elif v.isdigit() and Path(f"/proc/{v}").is_dir():
            out.append(int(v))
        else:
            raise SupplyError(f"--pid {v}: no such process (give a pid or 'auto')")
    return list(dict.fromkeys(out))


def _emit(docs: dict[str, str], args: argparse.Namespace, settings: Any) -> list[Path]:
    requested = [f for f in ("cyclonedx", "spdx") if f in docs and (args.format in (f, "both"))]
    if args.output == "-":
        for f in requested:
            sys.stdout.write(docs[f])
            sys.stdout.write("\n")
        return []
    if args.output is not None and args.format != "both":
        target = Path(args.output)
        _write_atomic(target, docs[requested[0]])
        print(f"wrote {target}", file=sys.stderr)
        return [target]
    outdir = Path(args.output) if args.output else (settings.supply.output_dir or settings.data_dir / "sbom")
    written: list[Path] = []
    for f in requested:
        target = outdir / FILENAMES[f]
        _write_atomic(target, docs[f])
        print(f"wrote {target}", file=sys.stderr)
        written.append(target)
    return written


def _sign(written: list[Path], args: argparse.Namespace, settings: Any) -> Path:
    import asyncio

    from xcstack.supply.signature import build_manifest, sign_manifest

    manifest = asyncio.run(sign_manifest(settings, build_manifest(settings, written)))
    target = (written[0].parent / "xcstack.sbom.sig.json") if len(written) > 1 else \
        written[0].with_name(written[0].name + ".sig.json")
    _write_atomic(target, json.dumps(manifest, indent=2, ensure_ascii=False))
    print(f"wrote {target} (SM2, key {manifest['key_id']})", file=sys.stderr)
    return target


def _verify_signature(path: Path, settings: Any) -> int:
    import asyncio

    from xcstack.supply.signature import check_files, check_signature, load_manifest

    try:
        manifest = load_manifest(path)
    except SupplyError as exc:
        print(f"xcstack sbom: {exc}", file=sys.stderr)
        return 2
    problems = [] if asyncio.run(check_signature(settings, manifest)) else [
        f"{path}: signature invalid (file altered, or signed by another key)"]
    problems += check_files(path, manifest)
    for p in problems:
        print(f"FAIL {p}")
    print(f"signature: {'FAIL' if problems else 'ok'} ({path})")
    return 1 if problems else 0


def _diff(cyclonedx_text: str, args: argparse.Namespace) -> int:
    from xcstack.supply.diff import diff_documents

    try:
        old = json.loads(args.diff.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"xcstack sbom: --diff {args.diff}: {exc}", file=sys.stderr)
        return 2
    report = diff_documents(old, json.loads(cyclonedx_text))
    print(report.render())
    if args.report is not None:
        _write_atomic(args.report, json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return 1 if report.changed else 0


def _audit(cyclonedx_text: str, advisories: Path | None, args: argparse.Namespace, settings: Any) -> int:
    from xcstack.supply.audit import audit_document, load_advisories
    from xcstack.supply.licenses import LicensePolicy

    sup = settings.supply
    doc = json.loads(cyclonedx_text)
    db = load_advisories(advisories, doc) if advisories is not None else None
    allow = args.license_allow if args.license_allow is not None else sup.license_allow
    deny = args.license_deny if args.license_deny is not None else sup.license_deny
    policy = LicensePolicy(list(allow), list(deny)) if (allow or deny) else None
    report = audit_document(
        doc, db,
        threshold=args.severity or sup.severity_threshold,
        unknown_severity=sup.unknown_severity,
        ignore=[*sup.ignore_vulns, *args.ignore],
        policy=policy,
        unknown_license=args.unknown_license or sup.unknown_license,
    )
    print(report.render())
    if args.report is not None:
        _write_atomic(args.report, json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return 1 if report.failed else 0
