"""`xcstack sbom --audit`: vulnerabilities (offline OSV) and license policy over a CycloneDX document.

The audit works on the CycloneDX JSON (the one just generated, or one from another host given with
`--sbom`), so what is audited is exactly what the SBOM says: every component with a purl, nested ones
included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcstack.supply.licenses import LicenseInfo, LicensePolicy, PolicyResult, spdx_expression
from xcstack.supply.osv import RANK, AdvisoryDB, Component, Finding, purl_component


@dataclass
class LicenseFinding:
    ref: str
    name: str
    version: str
    license: str
    result: PolicyResult


@dataclass
class AuditReport:
    components: int
    advisories_loaded: int
    findings: list[Finding] = field(default_factory=list)
    ignored: list[Finding] = field(default_factory=list)
    license_findings: list[LicenseFinding] = field(default_factory=list)
    threshold: str = "high"
    unknown_severity: str = "high"
    unknown_license: str = "warn"

    def effective_severity(self, f: Finding) -> str:
        return f.severity or self.unknown_severity

    @property
    def failing_vulns(self) -> list[Finding]:
        return [f for f in self.findings if RANK[self.effective_severity(f)] >= RANK[self.threshold]]

    @property
    def denied_licenses(self) -> list[LicenseFinding]:
        out = [lf for lf in self.license_findings if lf.result.verdict == "denied"]
        if self.unknown_license == "deny":
            out += [lf for lf in self.license_findings if lf.result.verdict == "unknown"]
        return out

    @property
    def failed(self) -> bool:
        return bool(self.failing_vulns or self.denied_licenses)

    def to_dict(self) -> dict[str, Any]:
        def fd(f: Finding) -> dict[str, Any]:
            return {"id": f.advisory_id, "aliases": f.aliases, "purl": f.component.purl,
                    "severity": self.effective_severity(f), "severity_source": f.severity_source,
                    "fixed": f.fixed, "summary": f.summary,
                    "fails": RANK[self.effective_severity(f)] >= RANK[self.threshold]}

        return {
            "components": self.components,
            "advisories_loaded": self.advisories_loaded,
            "threshold": self.threshold,
            "failed": self.failed,
            "vulnerabilities": [fd(f) for f in self.findings],
            "ignored": [fd(f) for f in self.ignored],
            "licenses": [
                {"ref": lf.ref, "name": lf.name, "version": lf.version, "license": lf.license,
                 "verdict": lf.result.verdict, "reason": lf.result.reason}
                for lf in self.license_findings if lf.result.verdict != "allowed"
            ],
        }

    def render(self) -> str:
        lines: list[str] = []
        for f in sorted(self.findings, key=lambda x: (-RANK[self.effective_severity(x)], x.component.purl)):
            sev = self.effective_severity(f)
            mark = "FAIL" if RANK[sev] >= RANK[self.threshold] else "warn"
            fix = f" (fixed in {', '.join(f.fixed)})" if f.fixed else ""
            lines.append(f"{mark} {sev:8} {f.advisory_id:24} {f.component.purl}{fix} [{f.severity_source}]")
        for f in self.ignored:
            lines.append(f"ignored  {f.advisory_id:24} {f.component.purl}")
        for lf in self.license_findings:
            if lf.result.verdict == "allowed":
                continue
            verdict = lf.result.verdict
            fails = verdict == "denied" or (verdict == "unknown" and self.unknown_license == "deny")
            if verdict == "unknown" and self.unknown_license == "allow":
                continue
            lines.append(f"{'FAIL' if fails else 'warn'} license  {lf.name}@{lf.version}: {lf.license} "
                         f"({lf.result.reason})")
        n_fail = len(self.failing_vulns)
        lines.append(
            f"audit: {self.components} components, {self.advisories_loaded} advisories; "
            f"{len(self.findings)} vulnerable match(es), {n_fail} at/above {self.threshold}; "
            f"{len(self.denied_licenses)} license violation(s) -> {'FAIL' if self.failed else 'ok'}"
        )
        return "\n".join(lines)


def _license_of(c: dict[str, Any]) -> str | None:
    parts: list[str] = []
    for entry in c.get("licenses") or []:
        if "expression" in entry:
            parts.append(f"({entry['expression']})")
        elif "license" in entry:
            lic = entry["license"]
            parts.append(str(lic.get("id") or lic.get("name") or ""))
    parts = [p for p in parts if p]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else " OR ".join(parts)


def iter_components(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = list(doc.get("components") or [])
    root = (doc.get("metadata") or {}).get("component")
    if root:
        stack.append(root)
    while stack:
        c = stack.pop()
        yield c
        stack.extend(c.get("components") or [])


def audit_document(
    doc: dict[str, Any],
    db: AdvisoryDB | None,
    *,
    threshold: str = "high",
    unknown_severity: str = "high",
    ignore: list[str] | None = None,
    policy: LicensePolicy | None = None,
    unknown_license: str = "warn",
    license_scope: str = "packages",
) -> AuditReport:
    comps: list[Component] = []
    lic_findings: list[LicenseFinding] = []
    for c in iter_components(doc):
        purl = c.get("purl")
        lic_text = _license_of(c)
        if purl:
            comp = purl_component(str(c.get("bom-ref") or purl), str(purl), lic_text)
            if comp is not None:
                comps.append(comp)
                src = source_package(c)
                if src and src != comp.name:
                    # Debian/openEuler advisories name the source package (openssl), not the binary (libssl3)
                    comps.append(Component(comp.ref, comp.purl, comp.ecosystem, src, comp.version, lic_text))
        if policy is not None and c.get("type") != "file" and (purl or c.get("type") == "machine-learning-model"):
            if license_scope == "packages" and c.get("type") in {"operating-system", "platform"}:
                continue
            info = _info(lic_text)
            ref = str(c.get("bom-ref") or c.get("name"))
            lic_findings.append(
                LicenseFinding(ref, str(c.get("name")), str(c.get("version") or ""), info.display(), policy.check(info))
            )
    report = AuditReport(len(comps), db.count if db else 0, threshold=threshold, unknown_severity=unknown_severity,
                         unknown_license=unknown_license, license_findings=lic_findings)
    ignored = set(ignore or [])
    if db is not None:
        seen: set[tuple[str, str]] = set()
        for comp in comps:
            for f in db.match(comp):
                key = (comp.purl, min(f.ids))
                if key in seen:
                    continue
                seen.add(key)
                if f.ids & ignored:
                    report.ignored.append(f)
                else:
                    report.findings.append(f)
    return report


def source_package(c: dict[str, Any]) -> str | None:
    """The source package of an OS package component (property `xcstack:source-package`: a Debian source
    name, or an RPM's SOURCERPM file name such as openssl-3.0.12-5.oe2203.src.rpm)."""
    for prop in c.get("properties") or []:
        if prop.get("name") == "xcstack:source-package" and prop.get("value"):
            value = str(prop["value"]).split()[0]
            if value.endswith(".src.rpm"):
                parts = value[: -len(".src.rpm")].rsplit("-", 2)
                return parts[0] if len(parts) == 3 else None
            return value
    return None


def _info(text: str | None) -> LicenseInfo:
    if not text:
        return LicenseInfo(None, None, "none")
    expr = spdx_expression(text.strip("()") if text.count("(") == 1 and text.startswith("(") else text)
    return LicenseInfo(expr, None if expr else text, "sbom")


def ecosystems_of(doc: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for c in iter_components(doc):
        if c.get("purl"):
            comp = purl_component("", str(c["purl"]))
            if comp is not None:
                out.add(comp.ecosystem)
    return out


def load_advisories(source: Path, doc: dict[str, Any]) -> AdvisoryDB:
    return AdvisoryDB.load(source, ecosystems_of(doc))
