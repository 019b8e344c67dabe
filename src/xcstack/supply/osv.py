"""Offline OSV advisory matching.

Reads an OSV export laid out as osv-scanner's offline databases (`<dir>/<ecosystem>/all.zip`, each a zip
of OSV JSON records), or any directory / zip / single file of OSV JSON. Only the ecosystems that the
components need are loaded. A component (purl) is affected when one `affected[]` entry names its
ecosystem and package and either lists its version in `versions` or one of its ECOSYSTEM/SEMVER ranges
covers it, evaluated as the OSV schema specifies (events sorted by version; `introduced` opens,
`fixed` closes before, `last_affected` closes after, `limit` bounds). Versions compare with `packaging`
for PyPI, dpkg rules for Debian-family ecosystems, RPM rules (rpmvercmp) for RPM ones, SemVer 2.0 for
SEMVER ranges. Severity: CVSS v3.x / v2 base scores computed from the vector; otherwise the database's
own rating (`database_specific.severity`, GitHub's MODERATE = medium).
"""

from __future__ import annotations

import functools
import json
import math
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from xcstack.supply.errors import AdvisoryError

SEVERITIES = ("none", "low", "medium", "high", "critical")
RANK = {s: i for i, s in enumerate(SEVERITIES)}

# purl type -> OSV ecosystem name (the directory name in osv-scanner's offline layout)
PURL_ECOSYSTEM = {"pypi": "PyPI", "npm": "npm", "golang": "Go", "cargo": "crates.io", "maven": "Maven",
                  "gem": "RubyGems", "nuget": "NuGet", "composer": "Packagist", "generic": ""}
_DEB_DISTROS = {"debian": "Debian", "ubuntu": "Ubuntu"}
_RPM_DISTROS = {"openeuler": "openEuler", "rocky": "Rocky Linux", "almalinux": "AlmaLinux", "rhel": "Red Hat"}


# --- version comparison --------------------------------------------------------------------------------
def _dpkg_order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _dpkg_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _dpkg_order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _dpkg_order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = (a[i] > b[j]) - (a[i] < b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def dpkg_compare(a: str, b: str) -> int:
    """dpkg's version comparison (epoch:upstream-revision)."""

    def split(v: str) -> tuple[int, str, str]:
        epoch = 0
        if ":" in v:
            e, v = v.split(":", 1)
            epoch = int(e) if e.isdigit() else 0
        up, _, rev = v.rpartition("-") if "-" in v else (v, "", "0")
        return epoch, up, rev or "0"

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _dpkg_part(ua, ub) or _dpkg_part(ra, rb)


def rpm_compare(a: str, b: str) -> int:
    """rpmvercmp over [epoch:]version-release."""

    def seg(v: str) -> list[str]:
        return re.findall(r"~|\^|\d+|[A-Za-z]+", v)

    def cmp(x: str, y: str) -> int:
        sx, sy = seg(x), seg(y)
        while sx or sy:
            if (sx and sx[0] == "~") or (sy and sy[0] == "~"):
                if not (sx and sx[0] == "~"):
                    return 1
                if not (sy and sy[0] == "~"):
                    return -1
                sx, sy = sx[1:], sy[1:]
                continue
            if not sx:
                return -1
            if not sy:
                return 1
            p, q = sx.pop(0), sy.pop(0)
            if p.isdigit() and q.isdigit():
                c = (int(p) > int(q)) - (int(p) < int(q))
            elif p.isdigit():
                return 1
            elif q.isdigit():
                return -1
            else:
                c = (p > q) - (p < q)
            if c:
                return c
        return 0

    def split(v: str) -> tuple[int, str]:
        if ":" in v:
            e, v = v.split(":", 1)
            return (int(e) if e.isdigit() else 0), v
        return 0, v

    ea, va = split(a)
    eb, vb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return cmp(va, vb)


_SEMVER = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.\-]+))?(?:\+[0-9A-Za-z.\-]+)?$")


def semver_key(v: str) -> tuple[Any, ...]:
    m = _SEMVER.match(v.strip())
    if not m:
        raise ValueError(f"not a SemVer version: {v!r}")
    core = tuple(int(x or 0) for x in m.group(1, 2, 3))
    pre = m.group(4)
    if pre is None:
        return (*core, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*core, 0, ids)


def _cmp_with(key: Callable[[str], Any]) -> Callable[[str, str], int]:
    def cmp(a: str, b: str) -> int:
        ka, kb = key(a), key(b)
        return (ka > kb) - (ka < kb)

    return cmp


def _pep440_key(v: str) -> Version:
    return Version(v)


def comparator(ecosystem: str, range_type: str) -> Callable[[str, str], int]:
    if range_type == "SEMVER":
        return _cmp_with(semver_key)
    base = ecosystem.split(":", 1)[0]
    if base == "PyPI":
        return _cmp_with(_pep440_key)
    if base in {"Debian", "Ubuntu"}:
        return dpkg_compare
    if base in {"openEuler", "Rocky Linux", "AlmaLinux", "Red Hat", "SUSE", "openSUSE", "Mageia"}:
        return rpm_compare
    return _cmp_with(semver_key)


# --- severity ------------------------------------------------------------------------------------------
def _roundup(x: float) -> float:
    i = round(x * 100000)
    return i / 100000.0 if i % 10000 == 0 else (math.floor(i / 10000) + 1) / 10.0


def cvss3_score(vector: str) -> float:
    m = dict(p.split(":", 1) for p in vector.split("/")[1:] if ":" in p)
    av = {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2}[m["AV"]]
    ac = {"L": 0.77, "H": 0.44}[m["AC"]]
    ui = {"N": 0.85, "R": 0.62}[m["UI"]]
    changed = m["S"] == "C"
    pr = {"N": 0.85, "L": 0.68 if changed else 0.62, "H": 0.5 if changed else 0.27}[m["PR"]]
    cia = {"H": 0.56, "L": 0.22, "N": 0.0}
    iss = 1 - (1 - cia[m["C"]]) * (1 - cia[m["I"]]) * (1 - cia[m["A"]])
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    if impact <= 0:
        return 0.0
    expl = 8.22 * av * ac * pr * ui
    return _roundup(min(1.08 * (impact + expl), 10)) if changed else _roundup(min(impact + expl, 10))


def cvss2_score(vector: str) -> float:
    m = dict(p.split(":", 1) for p in vector.split("/") if ":" in p)
    av = {"L": 0.395, "A": 0.646, "N": 1.0}[m["AV"]]
    ac = {"H": 0.35, "M": 0.61, "L": 0.71}[m["AC"]]
    au = {"M": 0.45, "S": 0.56, "N": 0.704}[m["Au"]]
    cia = {"N": 0.0, "P": 0.275, "C": 0.660}
    impact = 10.41 * (1 - (1 - cia[m["C"]]) * (1 - cia[m["I"]]) * (1 - cia[m["A"]]))
    expl = 20 * av * ac * au
    f = 0 if impact == 0 else 1.176
    return round((0.6 * impact + 0.4 * expl - 1.5) * f, 1)


def score_to_severity(score: float) -> str:
    if score == 0:
        return "none"
    if score < 4.0:
        return "low"
    if score < 7.0:
        return "medium"
    if score < 9.0:
        return "high"
    return "critical"


_WORDS = {"low": "low", "moderate": "medium", "medium": "medium", "high": "high", "important": "high",
          "critical": "critical", "negligible": "low", "unimportant": "low"}


def advisory_severity(adv: dict[str, Any], affected: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """(severity or None, how it was derived)."""
    best: tuple[float, str] | None = None
    for sev in list(adv.get("severity") or []) + list((affected or {}).get("severity") or []):
        kind, score = str(sev.get("type", "")), str(sev.get("score", ""))
        try:
            if kind == "CVSS_V3" or score.startswith("CVSS:3"):
                value = cvss3_score(score)
            elif kind == "CVSS_V2":
                value = cvss2_score(score)
            else:
                continue
        except (KeyError, ValueError, IndexError):
            continue
        if best is None or value > best[0]:
            best = (value, f"{kind} {value:.1f}")
    if best is not None:
        return score_to_severity(best[0]), best[1]
    for holder in ((affected or {}).get("ecosystem_specific"), (affected or {}).get("database_specific"),
                   adv.get("database_specific")):
        if isinstance(holder, dict):
            word = holder.get("severity")
            if isinstance(word, str) and word.lower() in _WORDS:
                return _WORDS[word.lower()], f"database severity {word}"
    return None, "no severity in advisory"


# --- matching ------------------------------------------------------------------------------------------
def in_range(version: str, events: list[dict[str, str]], cmp: Callable[[str, str], int]) -> bool:
    """OSV range evaluation for one range's events."""
    def ev_version(e: dict[str, str]) -> str:
        return next(iter(e.values()))

    def _by_version(a: str, b: str) -> int:
        return _safe_cmp(a, b, cmp)

    key_of = functools.cmp_to_key(_by_version)

    def sort_key(e: dict[str, str]) -> Any:
        return key_of(ev_version(e))

    ordered = sorted((e for e in events if e), key=sort_key)
    affected = False
    for e in ordered:
        if "introduced" in e:
            if e["introduced"] == "0" or _safe_cmp(version, e["introduced"], cmp) >= 0:
                affected = True
        elif "fixed" in e:
            if _safe_cmp(version, e["fixed"], cmp) >= 0:
                affected = False
        elif "last_affected" in e:
            if _safe_cmp(version, e["last_affected"], cmp) > 0:
                affected = False
        elif "limit" in e:
            if e["limit"] != "*" and _safe_cmp(version, e["limit"], cmp) >= 0:
                affected = False
    return affected


def _safe_cmp(a: str, b: str, cmp: Callable[[str, str], int]) -> int:
    if a == "0" and b != "0":
        return -1
    if b == "0" and a != "0":
        return 1
    return cmp(a, b)


@dataclass
class Component:
    ref: str
    purl: str
    ecosystem: str  # OSV ecosystem ("PyPI", "Debian:12")
    name: str  # as OSV names it (canonical for PyPI)
    version: str
    license: str | None = None


@dataclass
class Finding:
    component: Component
    advisory_id: str
    aliases: list[str]
    summary: str
    severity: str | None
    severity_source: str
    fixed: list[str] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {self.advisory_id, *self.aliases}


def purl_component(ref: str, purl: str, license_text: str | None = None) -> Component | None:
    from packageurl import PackageURL

    try:
        p = PackageURL.from_string(purl)
    except ValueError:
        return None
    if not p.version:
        return None
    if p.type == "pypi":
        return Component(ref, purl, "PyPI", canonicalize_name(p.name), p.version, license_text)
    if p.type == "deb":
        distro = (p.qualifiers or {}).get("distro", "") if isinstance(p.qualifiers, dict) else ""
        ns = (p.namespace or "debian").lower()
        eco = _DEB_DISTROS.get(ns, ns.capitalize())
        m = re.match(r"^[a-z]+-(\d+)", distro or "")
        return Component(ref, purl, f"{eco}:{m.group(1)}" if m else eco, p.name, p.version, license_text)
    if p.type == "rpm":
        ns = (p.namespace or "").lower()
        eco = _RPM_DISTROS.get(ns, ns)
        return Component(ref, purl, eco, p.name, p.version, license_text)
    other = PURL_ECOSYSTEM.get(p.type)
    if other:
        name = f"{p.namespace}/{p.name}" if p.namespace else p.name
        return Component(ref, purl, other, name, p.version, license_text)
    return None


class AdvisoryDB:
    """Advisories indexed by (ecosystem base, package name)."""

    def __init__(self) -> None:
        self.by_package: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.count = 0
        self.sources: list[str] = []

    @staticmethod
    def _key(ecosystem: str, name: str) -> tuple[str, str]:
        base = ecosystem.split(":", 1)[0]
        return base, (canonicalize_name(name) if base == "PyPI" else name)

    def add(self, adv: dict[str, Any]) -> None:
        if not isinstance(adv, dict) or adv.get("withdrawn"):
            return
        self.count += 1
        seen: set[tuple[str, str]] = set()
        for aff in adv.get("affected") or []:
            pkg = aff.get("package") or {}
            eco, name = pkg.get("ecosystem"), pkg.get("name")
            if not eco or not name:
                continue
            key = self._key(eco, name)
            if key not in seen:
                seen.add(key)
                self.by_package.setdefault(key, []).append(adv)

    @classmethod
    def load(cls, source: str | Path, ecosystems: Iterable[str] | None = None) -> AdvisoryDB:
        db = cls()
        path = Path(source)
        wanted = {e.split(":", 1)[0] for e in ecosystems} if ecosystems is not None else None
        if not path.exists():
            raise AdvisoryError(f"advisory source {path}: not found")
        for name, data in _iter_json(path, wanted):
            try:
                adv = json.loads(data)
            except ValueError as exc:
                raise AdvisoryError(f"{name}: not JSON: {exc}") from None
            for item in adv if isinstance(adv, list) else [adv]:
                db.add(item)
        db.sources.append(str(path))
        return db

    def match(self, comp: Component) -> list[Finding]:
        out: list[Finding] = []
        for adv in self.by_package.get(self._key(comp.ecosystem, comp.name), []):
            hit = _affected_entry(adv, comp)
            if hit is None:
                continue
            sev, how = advisory_severity(adv, hit)
            fixed = sorted({e["fixed"] for r in hit.get("ranges") or [] for e in r.get("events") or [] if "fixed" in e})
            out.append(Finding(comp, str(adv.get("id")), list(adv.get("aliases") or []),
                               str(adv.get("summary") or adv.get("details") or "")[:300], sev, how, fixed))
        return out


def _eco_matches(adv_eco: str, comp_eco: str) -> bool:
    if adv_eco == comp_eco:
        return True
    a_base, _, a_rel = adv_eco.partition(":")
    c_base, _, c_rel = comp_eco.partition(":")
    return a_base == c_base and (not a_rel or not c_rel or a_rel == c_rel)


def _affected_entry(adv: dict[str, Any], comp: Component) -> dict[str, Any] | None:
    for aff in adv.get("affected") or []:
        pkg = aff.get("package") or {}
        eco, name = str(pkg.get("ecosystem", "")), str(pkg.get("name", ""))
        if not _eco_matches(eco, comp.ecosystem):
            continue
        if AdvisoryDB._key(eco, name)[1] != comp.name:
            continue
        if comp.version in (aff.get("versions") or []):
            return dict(aff)
        for rng in aff.get("ranges") or []:
            rtype = rng.get("type")
            if rtype not in {"ECOSYSTEM", "SEMVER"}:
                continue
            try:
                if in_range(comp.version, rng.get("events") or [], comparator(eco, rtype)):
                    return dict(aff)
            except (InvalidVersion, ValueError, TypeError):
                continue
    return None


def _iter_json(path: Path, wanted: set[str] | None) -> Iterator[tuple[str, bytes]]:
    if path.is_file():
        if zipfile.is_zipfile(path):
            yield from _iter_zip(path)
        else:
            yield str(path), path.read_bytes()
        return
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        dirs = p.relative_to(path).parts[:-1]
        if wanted is not None and any(d in KNOWN_ECOSYSTEMS and d not in wanted for d in dirs):
            continue  # osv-scanner layout: [osv-scanner/]<ecosystem>/all.zip; skip ecosystems nobody needs
        if p.suffix == ".zip":
            yield from _iter_zip(p)
        elif p.suffix == ".json":
            yield str(p), p.read_bytes()


KNOWN_ECOSYSTEMS = frozenset({
    "PyPI", "npm", "Go", "crates.io", "Maven", "RubyGems", "NuGet", "Packagist", "Debian", "Ubuntu", "Alpine",
    "openEuler", "Rocky Linux", "AlmaLinux", "Red Hat", "SUSE", "openSUSE", "Hex", "Pub", "Hackage",
    "GitHub Actions", "Linux", "Android", "OSS-Fuzz", "Bitnami", "Photon OS", "Mageia", "Wolfi", "Chainguard",
    "CRAN", "Bioconductor", "SwiftURL", "GIT", "ConanCenter", "MinimOS", "Echo",
})


def _iter_zip(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".json") and not info.is_dir():
                    yield f"{path}!{info.filename}", zf.read(info)
    except zipfile.BadZipFile as exc:
        raise AdvisoryError(f"{path}: bad zip: {exc}") from None
