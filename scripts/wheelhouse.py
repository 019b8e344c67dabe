#!/usr/bin/env python3
"""Resolve and check an offline wheelhouse for a TARGET (its arch, full Python version, glibc), not this machine.

pip evaluates the markers of transitive requirements for the interpreter that runs it, even with
`--platform/--python-version`: a wheelhouse pip downloads on x86_64 with Python 3.11.7 lacks
`async-timeout` (redis: `python_full_version < "3.11.3"`) that Debian 12's 3.11.2 needs. So
scripts/wheelhouse.sh lets pip fetch, then this resolver walks the wheelhouse's own metadata with the
target's markers, names what is missing (wheelhouse.sh fetches it and asks again) and, as the last step,
fails when the offline install on the target would fail. Stdlib + `packaging` only.

    wheelhouse.py toplevel XCSTACK.whl OUT_DIR   # xcstack's own requirements -> OUT_DIR/reqs.txt, sdist.txt
    wheelhouse.py check WH [--missing FILE]      # exit 1 when `pip install --no-index` on the target would fail
Both take --arch, --python (full version: 3.11.2), --glibc (2.28), --extras (postgres,redis,...).
"""

from __future__ import annotations

import argparse
import email.parser
import re
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

# what pip assumes for an sdist without a pyproject.toml [build-system] table
DEFAULT_BUILD_REQUIRES = ("setuptools>=40.8.0", "wheel")
PROJECT = "xcstack"


@dataclass(frozen=True)
class Target:
    """The machine `pip install --no-index` runs on."""

    arch: str  # x86_64 | aarch64 | loongarch64
    python: str  # the full version: markers such as python_full_version < "3.11.3" depend on the patch level
    glibc: tuple[int, int] = (2, 28)  # Kylin V10 / UOS 20 (2.28) is the oldest; Debian 12 has 2.36

    def env(self) -> dict[str, str]:
        """PEP 508 marker environment of the target."""
        major_minor = ".".join(self.python.split(".")[:2])
        return {"platform_machine": self.arch, "sys_platform": "linux", "platform_system": "Linux",
                "os_name": "posix", "python_version": major_minor, "python_full_version": self.python,
                "implementation_name": "cpython", "implementation_version": self.python,
                "platform_python_implementation": "CPython", "platform_release": "", "platform_version": ""}

    def tags(self) -> set[Tag]:
        """Wheel tags pip accepts on the target (manylinux up to its glibc, and wheels built there)."""
        major, minor = (int(p) for p in self.python.split(".")[:2])
        plats = [f"manylinux_{self.glibc[0]}_{m}_{self.arch}" for m in range(self.glibc[1], 16, -1)]
        legacy = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
        plats += [f"{name}_{self.arch}" for (g, m), name in legacy.items() if (g, m) <= self.glibc]
        plats.append(f"linux_{self.arch}")
        out = set(cpython_tags((major, minor), platforms=plats))
        out.update(compatible_tags((major, minor), f"cp{major}{minor}", platforms=plats))
        return out


@dataclass
class Dist:
    """One file of the wheelhouse: a wheel for the target, or an sdist (built on the target)."""

    name: NormalizedName
    version: Version
    path: Path
    wheel: bool
    requires: list[Requirement]
    requires_python: SpecifierSet | None = None
    build_requires: list[Requirement] = field(default_factory=list)


def _reqs(lines: list[str]) -> list[Requirement]:
    out = []
    for line in lines:
        try:
            out.append(Requirement(line))
        except InvalidRequirement:
            print(f"wheelhouse: ignoring unparsable requirement {line!r}", file=sys.stderr)
    return out


def _meta(text: str) -> tuple[list[Requirement], SpecifierSet | None, list[str]]:
    msg = email.parser.HeaderParser().parsestr(text)
    rp = msg.get("Requires-Python")
    return _reqs(msg.get_all("Requires-Dist") or []), SpecifierSet(rp) if rp else None, msg.get_all("Dynamic") or []


def _egg_requires(text: str) -> list[Requirement]:
    """setuptools' *.egg-info/requires.txt: `[extra]`, `[:marker]`, `[extra:marker]` sections."""
    out, marker = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            extra, _, cond = line[1:-1].partition(":")
            parts = ([f'extra == "{extra}"'] if extra else []) + ([f"({cond})"] if cond else [])
            marker = " and ".join(parts)
            continue
        out.extend(_reqs([f"{line}; {marker}" if marker else line]))
    return out


def read_dist(path: Path) -> Dist | None:
    """Metadata of a wheel (METADATA) or an sdist (PKG-INFO, else egg-info/requires.txt; pyproject's
    [build-system] requires, which the target needs in the wheelhouse to build it with --no-index)."""
    if path.name.endswith(".whl"):
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            return None
        with zipfile.ZipFile(path) as zf:
            meta = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            wreqs, wrp, _ = _meta(zf.read(meta).decode("utf-8", "replace"))
        return Dist(name, version, path, True, wreqs, wrp)
    if not path.name.endswith((".tar.gz", ".zip")):
        return None
    try:
        name, version = parse_sdist_filename(path.name)
    except InvalidSdistFilename:
        return None
    files: dict[str, bytes] = {}
    wanted = re.compile(r"^[^/]+/(PKG-INFO|pyproject\.toml|(src/)?[^/]*\.egg-info/requires\.txt)$")
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            files = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist() if wanted.match(n)}
    else:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                f = tf.extractfile(m) if m.isfile() and wanted.match(m.name) else None
                if f is not None:
                    files[m.name.split("/", 1)[1]] = f.read()
    reqs: list[Requirement] = []
    rp = None
    if "PKG-INFO" in files:
        reqs, rp, dynamic = _meta(files["PKG-INFO"].decode("utf-8", "replace"))
        if not reqs or "Requires-Dist" in dynamic:
            egg = next((v for k, v in files.items() if k.endswith("requires.txt")), None)
            if egg is not None:
                reqs = _egg_requires(egg.decode("utf-8", "replace"))
    build = list(DEFAULT_BUILD_REQUIRES)
    if "pyproject.toml" in files:
        try:
            system = tomllib.loads(files["pyproject.toml"].decode("utf-8", "replace")).get("build-system", {})
        except tomllib.TOMLDecodeError:
            system = {}
        build = list(system.get("requires", DEFAULT_BUILD_REQUIRES))
    return Dist(name, version, path, False, reqs, rp, _reqs(build))


def index(wheelhouse: Path, target: Target) -> dict[NormalizedName, list[Dist]]:
    """Installable files per project, best first (highest version; a wheel before the sdist)."""
    tags = target.tags()
    out: dict[NormalizedName, list[Dist]] = {}
    for path in sorted(wheelhouse.iterdir()):
        dist = read_dist(path)
        if dist is None:
            continue
        if dist.wheel and not (parse_wheel_filename(path.name)[3] & tags):
            continue  # a wheel for another platform or Python: the target's pip ignores it
        if dist.requires_python is not None and not dist.requires_python.contains(target.python, prereleases=True):
            continue
        out.setdefault(dist.name, []).append(dist)
    for dists in out.values():
        dists.sort(key=lambda d: (d.version, d.wheel), reverse=True)
    return out


@dataclass
class Resolution:
    chosen: dict[NormalizedName, Dist]
    missing: list[tuple[Requirement, str]]  # (requirement, who needs it)
    conflicts: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.conflicts


def resolve(roots: list[Requirement], idx: dict[NormalizedName, list[Dist]], target: Target) -> Resolution:
    """What `pip install --no-index` on the target would pick (highest version that fits), following every
    requirement whose marker holds there; sdists bring their build requirements. Greedy, restarted with a
    pin when a later requirement rules out an earlier pick (enough for a check; pip backtracks further)."""
    env = target.env()
    pins: dict[NormalizedName, Version] = {}
    for _ in range(50):
        chosen: dict[NormalizedName, Dist] = {}
        specs: dict[NormalizedName, list[tuple[Requirement, str]]] = {}
        missing: list[tuple[Requirement, str]] = []
        done: set[tuple[NormalizedName, str]] = set()
        todo: list[tuple[Requirement, str]] = [(r, "(requested)") for r in roots]
        restart = False
        while todo:
            req, parent = todo.pop(0)
            name = canonicalize_name(req.name)
            specs.setdefault(name, []).append((req, parent))
            if name not in chosen:
                fits = [d for d in idx.get(name, []) if req.specifier.contains(d.version, prereleases=True)
                        and (name not in pins or d.version == pins[name])]
                if not fits:
                    missing.append((req, parent))
                    continue
                chosen[name] = fits[0]
                todo.extend((b, f"build of {name}") for b in fits[0].build_requires
                            if b.marker is None or b.marker.evaluate({**env, "extra": ""}))
            dist = chosen[name]
            if not req.specifier.contains(dist.version, prereleases=True):
                every = [r for r, _ in specs[name]]
                better = [d for d in idx.get(name, []) if all(r.specifier.contains(d.version, prereleases=True)
                                                               for r in every)]
                if not better or pins.get(name) == better[0].version:
                    missing.append((req, f"{parent}; {name} {dist.version} already chosen"))
                    continue
                pins[name] = better[0].version
                restart = True
                break
            for extra in ("", *sorted(req.extras)):
                if (name, extra) in done:
                    continue
                done.add((name, extra))
                for sub in dist.requires:
                    if sub.marker is None:
                        holds = extra == ""
                    else:
                        holds = sub.marker.evaluate({**env, "extra": extra})
                    if holds:
                        todo.append((sub, f"{name} {dist.version}" + (f"[{extra}]" if extra else "")))
        if not restart:
            return Resolution(chosen, missing, [])
    return Resolution({}, [], ["no consistent choice after 50 restarts"])


def toplevel(wheel: Path, target: Target, extras: list[str], sdist_only: set[str]) -> tuple[list[str], list[str]]:
    """xcstack's own requirements for the target (markers evaluated, then dropped), split into those
    fetched as wheels and those asked for as sdists."""
    dist = read_dist(wheel)
    assert dist is not None and dist.name == PROJECT, wheel
    env = target.env()
    wanted, todo = {""}, list(extras)
    while todo:  # all = xcstack[postgres,...] expands here
        e = todo.pop()
        if e in wanted:
            continue
        wanted.add(e)
        todo += [x for r in dist.requires if canonicalize_name(r.name) == PROJECT and r.marker
                 and r.marker.evaluate({**env, "extra": e}) for x in r.extras]
    binary: set[str] = set()
    source: set[str] = set()
    for r in dist.requires:
        if canonicalize_name(r.name) == PROJECT:
            continue
        if any((r.marker.evaluate({**env, "extra": e}) if r.marker else e == "") for e in wanted):
            r.marker = None
            (source if canonicalize_name(r.name) in sdist_only else binary).add(str(r))
    return sorted(binary), sorted(source)


def _target(args: argparse.Namespace) -> Target:
    if args.python.count(".") != 2:
        raise SystemExit(f"wheelhouse: --python wants the target's full version (3.11.2), not {args.python!r}")
    major, minor = (int(p) for p in args.glibc.split("."))
    return Target(args.arch, args.python, (major, minor))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wheelhouse.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=["x86_64", "aarch64", "loongarch64"])
    p.add_argument("--python", required=True, help="the target's full Python version, e.g. 3.11.2")
    p.add_argument("--glibc", default="2.28", help="the target's glibc (manylinux tags it accepts)")
    p.add_argument("--extras", default="")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toplevel")
    t.add_argument("wheel", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--sdist-only", default="")
    c = sub.add_parser("check")
    c.add_argument("wheelhouse", type=Path)
    c.add_argument("--missing", type=Path, help="write the missing requirements here, one per line")
    args = p.parse_args(argv)
    target = _target(args)
    extras = [e for e in args.extras.split(",") if e]
    if args.cmd == "toplevel":
        binary, source = toplevel(args.wheel, target, extras, {canonicalize_name(n) for n in args.sdist_only.split()})
        (args.out / "reqs.txt").write_text("".join(f"{r}\n" for r in binary))
        (args.out / "sdist.txt").write_text("".join(f"{r}\n" for r in source))
        print(f"wheelhouse: linux/{target.arch}: {len(binary)} requirements as wheels, {len(source)} as sdists",
              file=sys.stderr)
        return 0
    root = Requirement(f"{PROJECT}[{','.join(extras)}]" if extras else PROJECT)
    res = resolve([root], index(args.wheelhouse, target), target)
    for req, parent in res.missing:
        print(f"wheelhouse: MISSING for linux/{target.arch} Python {target.python}: {req} (needed by {parent})",
              file=sys.stderr)
    for line in res.conflicts:
        print(f"wheelhouse: CONFLICT: {line}", file=sys.stderr)
    if args.missing is not None:
        merged: dict[NormalizedName, SpecifierSet] = {}
        for r, _ in res.missing:  # one line per project: pip download takes the highest version fitting all
            merged[canonicalize_name(r.name)] = merged.get(canonicalize_name(r.name), SpecifierSet()) & r.specifier
        args.missing.write_text("".join(f"{n}{s}\n" for n, s in sorted(merged.items())))
    if res.ok:
        sdists = sorted(f"{d.name}=={d.version}" for d in res.chosen.values() if not d.wheel)
        print(f"wheelhouse: complete for linux/{target.arch} Python {target.python} glibc "
              f"{'.'.join(map(str, target.glibc))}: {len(res.chosen)} distributions"
              + (f", built on the target from sdists: {' '.join(sdists)}" if sdists else ""), file=sys.stderr)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
