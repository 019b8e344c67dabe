"""Native shared libraries a process has loaded (/proc/<pid>/maps), and the OS packages that own them.

OS package look-ups are batched: one `dpkg -S` for every path (with its /usr-merged twin), one
`dpkg-query -W` for the versions; or one `rpm -qf` on RPM systems.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xcstack.supply.licenses import LicenseInfo, spdx_expression

_ELF_MAGIC = b"\x7fELF"


@dataclass
class OsPackage:
    name: str
    version: str
    arch: str
    manager: str  # "dpkg" | "rpm"
    maintainer: str = ""
    homepage: str = ""
    source: str = ""
    license: LicenseInfo = field(default_factory=lambda: LicenseInfo(None, None, "none"))


def mapped_files(pid: int | str = "self") -> list[str]:
    """Distinct regular files mapped into process `pid` that are ELF objects (libraries, the executable)."""
    maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")
    seen: dict[str, None] = {}
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        if not path.startswith("/") or path.endswith(" (deleted)") or path.startswith(("/dev/", "/memfd:")):
            continue
        seen.setdefault(path, None)
    out: list[str] = []
    for path in seen:
        if ".so" in os.path.basename(path) or _is_elf(path):
            out.append(path)
    return out


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _ELF_MAGIC
    except OSError:
        return False


def _usrmerge_twins(path: str) -> list[str]:
    if path.startswith("/usr/lib/") or path.startswith("/usr/bin/") or path.startswith("/usr/sbin/"):
        return [path, path[4:]]
    if path.startswith(("/lib/", "/lib64/", "/bin/", "/sbin/")):
        return [path, "/usr" + path]
    return [path]


def _run(cmd: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout


_DEB_LICENSE_FIX = re.compile(r"^(A?GPL|LGPL)-(\d(?:\.\d)?)(\+?)$", re.I)


def _deb_license_to_spdx(short: str) -> str | None:
    short = short.strip()
    m = _DEB_LICENSE_FIX.match(short)
    if m:
        fam, ver, plus = m.group(1).upper(), m.group(2), m.group(3)
        if "." not in ver:
            ver += ".0"
        return f"{fam}-{ver}-{'or-later' if plus else 'only'}"
    return spdx_expression(short)


def debian_copyright_license(package: str, root: str = "/") -> LicenseInfo:
    """License of the `Files: *` paragraph of a machine-readable (DEP-5) debian/copyright."""
    base = package.split(":", 1)[0]
    path = Path(root, "usr/share/doc", base, "copyright")
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError:
        return LicenseInfo(None, None, "none")
    if not text.startswith("Format:"):
        return LicenseInfo(None, None, "none")
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if any(ln.strip() == "Files: *" for ln in lines):
            for ln in lines:
                if ln.startswith("License:"):
                    short = ln[len("License:") :].strip()
                    if not short:
                        break
                    parts = [p.strip() for p in re.split(r"\s+or\s+|\s*\|\s*", short, flags=re.I)]
                    mapped = [_deb_license_to_spdx(p) for p in parts]
                    if all(mapped):
                        expr = " OR ".join(m for m in mapped if m)
                        return LicenseInfo(spdx_expression(expr) or expr, None, "debian/copyright")
                    return LicenseInfo(None, short[:200], "debian/copyright")
    return LicenseInfo(None, None, "none")


def dpkg_owners(paths: Iterable[str], timeout: float = 30.0) -> dict[str, str]:
    """path -> owning package (`name:arch`), in one `dpkg -S` call (unowned paths are absent)."""
    paths = list(paths)
    if not paths or not shutil.which("dpkg"):
        return {}
    query: dict[str, str] = {}
    for p in paths:
        for twin in _usrmerge_twins(p):
            query.setdefault(twin, p)
    out = _run(["dpkg", "-S", *query], timeout)
    owners: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("diversion ") or ": " not in line:
            continue
        pkgs, _, path = line.partition(": ")
        orig = query.get(path.strip())
        if orig is not None and orig not in owners:
            owners[orig] = pkgs.split(",")[0].strip()
    return owners


def dpkg_packages(names: Iterable[str], timeout: float = 30.0) -> dict[str, OsPackage]:
    """Package facts for `name[:arch]` names in one `dpkg-query -W` call."""
    names = sorted(set(names))
    if not names or not shutil.which("dpkg-query"):
        return {}
    fmt = "${binary:Package}\\t${Version}\\t${Architecture}\\t${Maintainer}\\t${Homepage}\\t${source:Package}\\n"
    out = _run(["dpkg-query", "-W", f"-f={fmt}", *names], timeout)
    pkgs: dict[str, OsPackage] = {}
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < 6:
            continue
        name, version, arch, maint, home, source = cols[:6]
        bare = name.split(":", 1)[0]
        pkg = OsPackage(bare, version, arch, "dpkg", maint, home, source, debian_copyright_license(bare))
        pkgs[name] = pkg
        pkgs.setdefault(bare, pkg)
    return pkgs


def rpm_owners(paths: Iterable[str], timeout: float = 30.0) -> dict[str, OsPackage]:
    """path -> owning RPM package, in one `rpm -qf` call (one output line per path argument)."""
    paths = list(paths)
    if not paths or not shutil.which("rpm"):
        return {}
    qf = "%{NAME}\\t%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{VENDOR}\\t%{LICENSE}\\t%{URL}\\t%{SOURCERPM}\\n"
    lines = _run(["rpm", "-qf", "--qf", qf, *paths], timeout).splitlines()
    if len(lines) != len(paths):
        # a file owned by two packages prints two lines: positions no longer line up, ask one by one
        lines = [(_run(["rpm", "-qf", "--qf", qf, p], timeout).splitlines() or [""])[0] for p in paths]
    owners: dict[str, OsPackage] = {}
    for path, line in zip(paths, lines, strict=True):
        cols = line.split("\t")
        if len(cols) < 7 or " is not owned " in line:
            continue
        name, version, arch, vendor, lic, url, srpm = cols[:7]
        expr = spdx_expression(lic)
        owners[path] = OsPackage(name, version, arch, "rpm", vendor, url, srpm,
                                 LicenseInfo(expr, None if expr else lic[:200], "rpm"))
    return owners


def os_owners(paths: list[str], family: str, timeout: float = 30.0) -> dict[str, OsPackage]:
    """path -> OsPackage with whichever package manager this host has (dpkg first on Debian-likes)."""
    order = ("rpm", "dpkg") if family == "rhel" else ("dpkg", "rpm")
    for manager in order:
        if manager == "dpkg" and shutil.which("dpkg"):
            owners = dpkg_owners(paths, timeout)
            facts = dpkg_packages(owners.values(), timeout)
            result = {p: facts[n] for p, n in owners.items() if n in facts}
            if result or not shutil.which("rpm"):
                return result
        if manager == "rpm" and shutil.which("rpm"):
            result2 = rpm_owners(paths, timeout)
            if result2 or not shutil.which("dpkg"):
                return result2
    return {}
