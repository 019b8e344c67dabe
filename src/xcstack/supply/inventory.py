"""What is installed and running: the facts an SBOM is made of.

`collect(...)` gathers, concurrently where it helps (file hashing and OS package queries run in a small
thread pool while package metadata is read):

- every installed Python distribution: name, version, license, supplier and author from its core
  metadata, its Requires-Dist (markers evaluated, extras propagated), and the SHA-256 of every file
  from its RECORD; a per-distribution content hash is derived from those (`tree_hash`, Go's dirhash
  "h1" construction over the RECORD entries, so it can be recomputed from the installed files alone);
- the interpreter binary (SHA-256 and SM3);
- the ELF objects mapped into a process (`/proc/<pid>/maps`), each hashed and attributed to the Python
  distribution whose RECORD lists it or to the OS package that owns it;
- model files of the model repository (`[inference] model_repository`, default `<data_dir>/models`):
  SHA-256, SM3, license from the model card/manifest;
- the platform (from xcstack.platform's probe).
"""

from __future__ import annotations

import base64
import csv
import getpass
import hashlib
import importlib
import importlib.metadata as md
import io
import json
import os
import platform as pyplatform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from xcstack.crypto.recipes import SM3
from xcstack.supply.licenses import LicenseInfo, normalise, spdx_expression
from xcstack.supply.native import OsPackage, mapped_files, os_owners

_CHUNK = 1 << 20


@dataclass
class Party:
    name: str
    email: str | None = None
    url: str | None = None
    source: str = "metadata"  # metadata | project-url | known


@dataclass
class FileEntry:
    path: str  # as in RECORD (relative to the install root) or relative to the model dir
    sha256: str | None  # hex
    size: int | None


@dataclass
class PyDist:
    name: str
    version: str
    key: str  # canonical name
    summary: str
    license: LicenseInfo
    supplier: Party | None
    authors: list[Party]
    homepage: str | None
    urls: dict[str, str]
    requires: list[str]
    location: str
    installer: str | None
    editable: bool
    files: list[FileEntry] = field(default_factory=list)
    record_sha256: str | None = None
    tree_hash: str | None = None
    depends_on: list[str] = field(default_factory=list)  # canonical names
    extras: set[str] = field(default_factory=set)

    @property
    def purl(self) -> str:
        return f"pkg:pypi/{self.key}@{quote_purl(self.version)}"


@dataclass
class Interpreter:
    implementation: str
    version: str
    path: str
    sha256: str
    sm3: str
    size: int
    cache_tag: str | None
    sha1: str = ""


@dataclass
class NativeLib:
    path: str
    sha256: str | None
    size: int | None
    py_dist: str | None = None  # canonical name of the Python distribution that installed it
    sha1: str | None = None
    pids: list[int] = field(default_factory=list)  # processes that have it mapped
    os_package: OsPackage | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class ModelFile:
    path: str
    sha256: str
    sm3: str
    size: int
    sha1: str = ""


@dataclass
class Model:
    name: str
    path: str
    files: list[ModelFile]
    license: LicenseInfo
    version: str | None = None
    supplier: Party | None = None
    sources: list[str] = field(default_factory=list)  # the packages it was assembled from (llm built-ins)


@dataclass
class PlatformInfo:
    arch: str
    os_id: str
    os_name: str
    os_version: str
    os_pretty: str
    os_family: str
    kernel: str
    cpu_vendor: str
    cpu_model: str
    hostname: str
    domestic_os: bool = False
    domestic_cpu: bool = False


@dataclass
class Inventory:
    timestamp: datetime
    author: str
    dists: dict[str, PyDist]
    interpreter: Interpreter
    platform: PlatformInfo
    native_libs: list[NativeLib]
    models: list[Model]
    pids: list[int]
    root_key: str | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def os_packages(self) -> dict[str, OsPackage]:
        out: dict[str, OsPackage] = {}
        for lib in self.native_libs:
            if lib.os_package is not None:
                out.setdefault(f"{lib.os_package.name}:{lib.os_package.arch}", lib.os_package)
        return out


_PURL_SAFE = re.compile(r"[^A-Za-z0-9.\-_~+]")


def quote_purl(value: str) -> str:
    return _PURL_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode()), value)


# --- hashing ------------------------------------------------------------------------------------------
def hash_file(path: str | Path, sm3: bool = False) -> tuple[str, str | None, int, str]:
    """(sha256 hex, sm3 hex or None, size, sha1 hex) of a file, streamed (SPDX files need SHA-1)."""
    sha = hashlib.sha256()
    sha1 = hashlib.sha1(usedforsecurity=False)
    sm = SM3() if sm3 else None
    size = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            sha.update(chunk)
            sha1.update(chunk)
            if sm is not None:
                sm.update(chunk)
    return sha.hexdigest(), (sm.hexdigest() if sm is not None else None), size, sha1.hexdigest()


def _b64_to_hex(value: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    except (ValueError, TypeError):
        return None


def tree_hash(files: Iterable[FileEntry]) -> str | None:
    """Go's dirhash Hash1 over (sha256, path) pairs: SHA-256 of "%x  %s\\n" lines sorted by path (hex)."""
    entries = sorted((f.path, f.sha256) for f in files if f.sha256)
    if not entries:
        return None
    h = hashlib.sha256()
    for path, digest in entries:
        h.update(f"{digest}  {path}\n".encode())
    return h.hexdigest()


# --- parties -------------------------------------------------------------------------------------------
def _parties(name_field: str | None, email_field: str | None) -> list[Party]:
    out: list[Party] = []
    if email_field:
        for name, addr in getaddresses([email_field]):
            if addr or name:
                out.append(Party(name.strip() or (addr.split("@")[0] if addr else "unknown"), addr or None))
    if name_field and name_field.strip().upper() not in {"UNKNOWN", "NONE"}:
        names = [n.strip() for n in re.split(r",| and ", name_field) if n.strip()]
        if out and len(out) == 1 and len(names) == 1 and out[0].email:
            out[0].name = names[0]
        elif not out:
            out = [Party(n[:200]) for n in names]
    return out


# Suppliers of distributions whose metadata names nobody (checked by hand against their own text).
KNOWN_SUPPLIERS: dict[str, Party] = {
    # dmPython's description: "模块由达梦数据库维护" (maintained by Dameng)
    "dmpython": Party("Dameng Database Co., Ltd.", None, "https://www.dameng.com", "known"),
}

_HOST_ORG = re.compile(r"^https?://(?:www\.)?(github\.com|gitlab\.com|gitee\.com|bitbucket\.org)/([^/#?]+)", re.I)


def _supplier_from_url(urls: Iterable[str]) -> Party | None:
    for url in urls:
        m = _HOST_ORG.match(url)
        if m:
            return Party(m.group(2), None, f"https://{m.group(1).lower()}/{m.group(2)}", "project-url")
    for url in urls:
        m2 = re.match(r"^https?://([^/]+)", url)
        if m2 and "pypi.org" not in m2.group(1) and "readthedocs" not in m2.group(1):
            return Party(m2.group(1), None, f"https://{m2.group(1)}", "project-url")
    return None


# --- Python distributions ------------------------------------------------------------------------------
def _read_record(dist: md.Distribution) -> tuple[list[FileEntry], str | None]:
    text = dist.read_text("RECORD")
    if text is None:
        return [], None
    files: list[FileEntry] = []
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        path = row[0]
        digest = row[1] if len(row) > 1 else ""
        size = row[2] if len(row) > 2 else ""
        hexd = None
        if digest.startswith("sha256="):
            hexd = _b64_to_hex(digest[7:])
        files.append(FileEntry(path, hexd, int(size) if size.isdigit() else None))
    return files, hashlib.sha256(text.encode()).hexdigest()


def read_distributions(paths: list[str] | None = None) -> dict[str, PyDist]:
    """Every distribution importable from `paths` (default sys.path); the first of a name wins."""
    out: dict[str, PyDist] = {}
    for dist in md.distributions(path=paths if paths is not None else sys.path):
        meta: Any = dist.metadata
        name = meta.get("Name")
        if not name:
            continue
        key = canonicalize_name(name)
        if key in out:
            continue
        urls: dict[str, str] = {}
        home = meta.get("Home-page")
        if home and home.upper() != "UNKNOWN":
            urls["homepage"] = home
        for entry in meta.get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if url.strip():
                urls.setdefault(label.strip().lower(), url.strip())
        maint = _parties(meta.get("Maintainer"), meta.get("Maintainer-email"))
        authors = _parties(meta.get("Author"), meta.get("Author-email"))
        supplier: Party | None = (maint or authors)[0] if (maint or authors) else None
        if supplier is None:
            supplier = _supplier_from_url(urls.values()) or KNOWN_SUPPLIERS.get(canonicalize_name(name))
        elif not supplier.url:
            guess = _supplier_from_url(urls.values())
            supplier.url = guess.url if guess else None
        location = str(dist.locate_file(""))
        installer = (dist.read_text("INSTALLER") or "").strip() or None
        direct = dist.read_text("direct_url.json")
        editable = False
        if direct:
            try:
                editable = bool(json.loads(direct).get("dir_info", {}).get("editable"))
            except ValueError:
                editable = False
        files, record_sha = _read_record(dist)
        pd = PyDist(
            name=name,
            version=meta.get("Version") or "0",
            key=key,
            summary=(meta.get("Summary") or "").strip(),
            license=normalise(meta),
            supplier=supplier,
            authors=authors or maint,
            homepage=urls.get("homepage") or urls.get("home") or urls.get("source") or urls.get("repository"),
            urls=urls,
            requires=list(dist.requires or []),
            location=location,
            installer=installer,
            editable=editable,
            files=files,
            record_sha256=record_sha,
            tree_hash=tree_hash(files),
        )
        out[key] = pd
    resolve_dependencies(out)
    return out


def resolve_dependencies(dists: dict[str, PyDist]) -> None:
    """Fill `depends_on` from Requires-Dist: markers evaluated for this interpreter; an extra counts as
    requested when another installed distribution asks for it, or when all of its requirements are
    installed (how an `pip install 'x[extra]'` shows after the fact)."""
    env: dict[str, Any] = dict(default_environment())
    parsed: dict[str, list[Requirement]] = {}
    for key, d in dists.items():
        reqs: list[Requirement] = []
        for raw in d.requires:
            try:
                reqs.append(Requirement(raw))
            except InvalidRequirement:
                continue
        parsed[key] = reqs

    def applies(req: Requirement, extra: str) -> bool:
        if req.marker is None:
            return extra == ""
        return bool(req.marker.evaluate({**env, "extra": extra}))

    def extras_of(reqs: list[Requirement]) -> set[str]:
        names: set[str] = set()
        for r in reqs:
            if r.marker is not None and "extra" in str(r.marker):
                for m in re.finditer(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(r.marker)):
                    names.add(m.group(1))
        return names

    # extras whose requirements are all installed
    for key, reqs in parsed.items():
        for extra in extras_of(reqs):
            needed = [canonicalize_name(r.name) for r in reqs if applies(r, extra) and not applies(r, "")]
            if needed and all(n in dists for n in needed):
                dists[key].extras.add(extra)
    # propagate extras requested by dependents, to a fixpoint
    changed = True
    rounds = 0
    while changed and rounds < 20:
        changed, rounds = False, rounds + 1
        for key, reqs in parsed.items():
            active = {""} | dists[key].extras
            for r in reqs:
                target = canonicalize_name(r.name)
                if target in dists and r.extras and any(applies(r, e) for e in active):
                    new = {canonicalize_name(e) for e in r.extras} - dists[target].extras
                    if new:
                        dists[target].extras |= new
                        changed = True
    for key, reqs in parsed.items():
        active = {""} | dists[key].extras
        deps: dict[str, None] = {}
        for r in reqs:
            target = canonicalize_name(r.name)
            if target != key and target in dists and any(applies(r, e) for e in active):
                deps[target] = None
        dists[key].depends_on = list(deps)


# --- interpreter, platform, models -----------------------------------------------------------------------
def interpreter_info(exe: str | None = None, timeout: float = 10.0) -> Interpreter:
    """The interpreter binary `exe` (default: this one); another binary is asked for its version."""
    own = os.path.realpath(sys.executable)
    exe = os.path.realpath(exe) if exe else own
    sha, sm3, size, sha1 = hash_file(exe, sm3=True)
    impl, version = pyplatform.python_implementation(), pyplatform.python_version()
    tag: str | None = sys.implementation.cache_tag
    if exe != own:
        impl, version, tag = "CPython", "unknown", None
        try:
            out = subprocess.run([exe, "-I", "-S", "-c", "import platform, sys; print(platform.python_implementation(),"
                                  " platform.python_version(), sys.implementation.cache_tag)"],
                                 capture_output=True, text=True, timeout=timeout, check=True).stdout.split()
            if len(out) == 3:
                impl, version, tag = out
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return Interpreter(implementation=impl, version=version, path=exe, sha256=sha, sm3=sm3 or "", size=size,
                       cache_tag=tag, sha1=sha1)


def is_xcstack_process(args: list[str], exe: str) -> bool:
    """A Python process running `xcstack serve` or `python -m xcstack.worker ...` (not, e.g., a `timeout`
    or `sudo` wrapper whose arguments mention them)."""
    if not os.path.basename(exe).startswith(("python", "pypy")):
        return False
    if "xcstack.worker" in args:
        return True
    return any(os.path.basename(a) == "xcstack" and "serve" in args[i + 1 :] for i, a in enumerate(args[:3]))


def find_xcstack_pids() -> list[int]:
    """Processes of a running xcstack: the supervisor (`xcstack serve`) and its workers
    (`python -m xcstack.worker ...`: http workers, model workers, the HSM owner)."""
    found: list[int] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if is_xcstack_process([a.decode(errors="replace") for a in argv if a], exe):
            found.append(int(entry.name))
    return sorted(found)


def platform_info() -> PlatformInfo:
    try:
        from xcstack.platform.probe import probe

        rep = probe(python=False)
        return PlatformInfo(
            arch=rep.arch,
            os_id=rep.os.id,
            os_name=rep.os.name,
            os_version=rep.os.version_id,
            os_pretty=rep.os.pretty_name,
            os_family=rep.os.family,
            kernel=rep.os.kernel or pyplatform.release(),
            cpu_vendor=rep.cpu.vendor_name,
            cpu_model=rep.cpu.model,
            hostname=rep.hostname,
            domestic_os=rep.os.domestic,
            domestic_cpu=rep.cpu.domestic,
        )
    except Exception as exc:  # the probe is best effort; the SBOM must still be produced
        return PlatformInfo(pyplatform.machine(), "unknown", pyplatform.system(), "", f"probe failed: {exc}",
                            "unknown", pyplatform.release(), "", "", pyplatform.node())


_FRONT_LICENSE = re.compile(r"^license:\s*['\"]?([^'\"\n]+)['\"]?\s*$", re.M | re.I)


def model_source(model_dir: Path) -> tuple[str | None, None, list[str]]:
    """(version, supplier, source packages) from an llm repository record (`model.json` of `xcstack llm
    assemble`: the chunk packages a built-in GGUF was assembled from)."""
    try:
        data = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, []
    src = data.get("source") if isinstance(data, dict) else None
    pkgs = src.get("packages") if isinstance(src, dict) else None
    version = data.get("version") if isinstance(data, dict) else None
    return (str(version) if version else None, None,
            [str(p) for p in pkgs] if isinstance(pkgs, list) else [])


def model_license(model_dir: Path) -> LicenseInfo:
    """From a manifest (`*.json` with "license"), a model card's YAML front matter, or a LICENSE file."""
    for manifest in ("xcstack-model.json", "model.json", "manifest.json", "config.json"):
        p = model_dir / manifest
        if p.is_file() and p.stat().st_size < 1 << 20:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            lic = data.get("license") if isinstance(data, dict) else None
            if isinstance(lic, str) and lic.strip():
                expr = spdx_expression(lic)
                return LicenseInfo(expr, None if expr else lic.strip()[:200], manifest)
    readme = model_dir / "README.md"
    if readme.is_file():
        try:
            head = readme.read_text(encoding="utf-8", errors="replace")[:8192]
        except OSError:
            head = ""
        if head.startswith("---"):
            front = head.split("---", 2)[1] if head.count("---") >= 2 else ""
            m = _FRONT_LICENSE.search(front)
            if m:
                expr = spdx_expression(m.group(1).strip())
                return LicenseInfo(expr, None if expr else m.group(1).strip()[:200], "README.md")
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE"):
        p = model_dir / name
        if p.is_file():
            try:
                first = p.read_text(encoding="utf-8", errors="replace").strip().splitlines()[:1]
            except OSError:
                first = []
            text = first[0].strip() if first else ""
            expr = spdx_expression(text) if text else None
            if expr is None and "apache license" in text.lower():
                expr = "Apache-2.0"
            if expr is None and text.lower().startswith(("mit license", "the mit license")):
                expr = "MIT"
            return LicenseInfo(expr, None if expr else (text[:200] or name), name)
    return LicenseInfo(None, None, "none")


def model_dirs(models_root: Path, max_files: int = 10000) -> list[tuple[str, Path, list[Path]]]:
    """(name, dir, files) for each model: a sub-directory, or a single file directly under the root."""
    if not models_root.is_dir():
        return []
    out: list[tuple[str, Path, list[Path]]] = []
    for entry in sorted(models_root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = [p for p in sorted(entry.rglob("*")) if p.is_file() and not p.name.startswith(".")]
            out.append((entry.name, entry, files[:max_files]))
        elif entry.is_file():
            out.append((entry.stem, models_root, [entry]))
    return out


def import_native_modules(names: Iterable[str]) -> list[str]:
    """Import each module (so its shared libraries are mapped); returns those that failed."""
    failed: list[str] = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    return failed


def default_author() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def collect(
    *,
    data_dir: Path | None = None,
    models_dir: Path | None = None,
    pids: Sequence[int] | None = None,
    native: bool = True,
    native_modules: Iterable[str] = (),
    author: str | None = None,
    os_timeout: float = 30.0,
    dist_paths: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Inventory:
    """Gather the inventory. pids None/empty: this process, after importing `native_modules`; else the
    union of the libraries those processes have mapped."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="xc-sbom") as pool:
        exe: str | None = None  # the interpreter of the first Python process given (default: this one)
        for pid in pids or ():
            try:
                candidate = os.readlink(f"/proc/{pid}/exe")
            except OSError as exc:
                warnings.append(f"cannot read the executable of pid {pid}: {exc}")
                continue
            if os.path.basename(candidate).startswith(("python", "pypy")):
                exe = candidate
                break
        f_interp = pool.submit(interpreter_info, exe)
        f_platform = pool.submit(platform_info)
        lib_futures: dict[str, Future[tuple[str, str | None, int, str]]] = {}
        path_pids: dict[str, list[int]] = {}
        if native:
            if not pids:
                failed = import_native_modules(native_modules)
                if failed:
                    warnings.append("native modules not importable here: " + ", ".join(failed))
            for target in list(pids) if pids else ["self"]:
                try:
                    mapped = mapped_files(target)
                except OSError as exc:
                    warnings.append(f"cannot read /proc/{target}/maps: {exc}")
                    continue
                who = os.getpid() if target == "self" else int(target)
                for p in mapped:
                    path_pids.setdefault(os.path.realpath(p), []).append(who)
            for p in path_pids:
                lib_futures[p] = pool.submit(hash_file, p, False)
        paths = list(path_pids)
        timings["native_discovery_s"] = time.perf_counter() - t0
        # model files
        model_jobs: list[tuple[str, Path, list[tuple[Path, Future[tuple[str, str | None, int, str]]]]]] = []
        mroot = models_dir if models_dir is not None else (Path(data_dir) / "models" if data_dir is not None else None)
        if mroot is not None:
            for name, mdir, files in model_dirs(mroot):
                model_jobs.append((name, mdir, [(f, pool.submit(hash_file, f, True)) for f in files]))
        if models_dir is None and data_dir is not None:  # the llm capability's GGUF repository
            for name, mdir, files in model_dirs(Path(data_dir) / "llm-models"):
                model_jobs.append((name, mdir, [(f, pool.submit(hash_file, f, True)) for f in files]))
        # distributions (main thread, while the pool hashes)
        t1 = time.perf_counter()
        dists = read_distributions(dist_paths)
        timings["distributions_s"] = time.perf_counter() - t1
        plat = f_platform.result()
        # attribute libraries: RECORD first, then OS packages
        by_real: dict[str, str] = {}
        if paths:
            for d in dists.values():
                base = os.path.realpath(d.location)
                for fe in d.files:
                    if ".so" in fe.path:
                        by_real[os.path.normpath(os.path.join(base, fe.path))] = d.key
        libs: list[NativeLib] = []
        unowned: list[str] = []
        for p in paths:
            owner = by_real.get(p)
            libs.append(NativeLib(p, None, None, owner, pids=path_pids[p]))
            if owner is None:
                unowned.append(p)
        t2 = time.perf_counter()
        exe_real = os.path.realpath(exe or sys.executable)
        owners = os_owners([u for u in unowned if u != exe_real], plat.os_family, os_timeout) if unowned else {}
        timings["os_packages_s"] = time.perf_counter() - t2
        for lib in libs:
            lib.os_package = owners.get(lib.path)
        for lib, fut in zip(libs, lib_futures.values(), strict=True):
            try:
                lib.sha256, _, lib.size, lib.sha1 = fut.result()
            except OSError as exc:
                warnings.append(f"cannot hash {lib.path}: {exc}")
        models: list[Model] = []
        for name, mdir, jobs in model_jobs:
            mfiles: list[ModelFile] = []
            for f, fut in jobs:
                try:
                    sha, sm3, size, sha1 = fut.result()
                except OSError as exc:
                    warnings.append(f"cannot hash {f}: {exc}")
                    continue
                mfiles.append(ModelFile(str(f.relative_to(mdir)), sha, sm3 or "", size, sha1))
            models.append(Model(name, str(mdir), mfiles, model_license(mdir), *model_source(mdir)))
        interp = f_interp.result()
    timings["total_s"] = time.perf_counter() - t0
    root_key = "xcstack" if "xcstack" in dists else None
    return Inventory(
        timestamp=datetime.now(UTC).replace(microsecond=0),
        author=author or default_author(),
        dists=dists,
        interpreter=interp,
        platform=plat,
        native_libs=libs,
        models=models,
        pids=list(pids) if pids else [os.getpid()],
        root_key=root_key,
        timings=timings,
        warnings=warnings,
    )


def as_jsonable(inv: Inventory) -> dict[str, Any]:  # pragma: no cover - debugging aid
    import dataclasses

    return dataclasses.asdict(inv)
