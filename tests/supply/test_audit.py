"""Offline OSV audit (version ranges, severities, thresholds) and the license policy."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from xcstack.cli import main
from xcstack.supply.audit import audit_document
from xcstack.supply.licenses import LicenseInfo, LicensePolicy, normalise, spdx_expression
from xcstack.supply.osv import (
    AdvisoryDB,
    advisory_severity,
    comparator,
    cvss2_score,
    cvss3_score,
    dpkg_compare,
    in_range,
    purl_component,
    rpm_compare,
    semver_key,
)

CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
MEDIUM = "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N"  # 6.1


def advisory(vid: str, name: str, events: list[dict[str, str]], *, eco: str = "PyPI", vector: str | None = CRITICAL,
             versions: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    aff: dict[str, Any] = {"package": {"ecosystem": eco, "name": name},
                           "ranges": [{"type": "ECOSYSTEM", "events": events}]}
    if versions is not None:
        aff["versions"] = versions
    adv: dict[str, Any] = {"schema_version": "1.6.0", "id": vid, "modified": "2025-01-01T00:00:00Z",
                           "summary": f"test advisory {vid}", "affected": [aff], **extra}
    if vector:
        adv["severity"] = [{"type": "CVSS_V3", "score": vector}]
    return adv


def write_osv_layout(root: Path, advisories: list[dict[str, Any]], ecosystem: str = "PyPI") -> Path:
    """osv-scanner's offline layout: <root>/<ecosystem>/all.zip of <id>.json."""
    (root / ecosystem).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / ecosystem / "all.zip", "w") as zf:
        for adv in advisories:
            zf.writestr(f"{adv['id']}.json", json.dumps(adv))
    return root


def sbom(*components: dict[str, Any]) -> dict[str, Any]:
    return {"bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
            "metadata": {"component": {"type": "application", "name": "app", "bom-ref": "app"}},
            "components": list(components)}


def lib(name: str, version: str, license_id: str | None = "MIT", purl_type: str = "pypi") -> dict[str, Any]:
    c: dict[str, Any] = {"type": "library", "name": name, "version": version, "bom-ref": f"{name}@{version}",
                         "purl": f"pkg:{purl_type}/{name}@{version}"}
    if license_id:
        c["licenses"] = [{"expression": license_id}] if " " in license_id else [{"license": {"id": license_id}}]
    return c


# --- versions -----------------------------------------------------------------------------------------
def test_dpkg_version_order() -> None:
    assert dpkg_compare("1.2-1~deb12u1", "1.2-1") < 0
    assert dpkg_compare("1:1.0", "2.0") > 0
    assert dpkg_compare("3.0.11-1~deb12u2", "3.0.11-1~deb12u10") < 0
    assert dpkg_compare("1.0a", "1.0") > 0 and dpkg_compare("1.0~rc1", "1.0") < 0
    assert dpkg_compare("2.36-9+deb12u4", "2.36-9+deb12u4") == 0


def test_rpm_and_semver_order() -> None:
    assert rpm_compare("1.1.1k-1.oe2203", "1.1.1m-1.oe2203") < 0
    assert rpm_compare("2.0~rc1", "2.0") < 0 and rpm_compare("1:0.9", "1.0") > 0
    assert semver_key("1.0.0-alpha") < semver_key("1.0.0-alpha.1") < semver_key("1.0.0-beta") < semver_key("1.0.0")
    assert semver_key("v2.1.3") > semver_key("2.1.2")


def test_osv_range_semantics() -> None:
    pep = comparator("PyPI", "ECOSYSTEM")
    events = [{"introduced": "1.0"}, {"fixed": "1.4.2"}, {"introduced": "2.0"}, {"last_affected": "2.1"}]
    assert not in_range("0.9", events, pep)
    assert in_range("1.0", events, pep) and in_range("1.4.1", events, pep)
    assert not in_range("1.4.2", events, pep) and not in_range("1.9", events, pep)
    assert in_range("2.1", events, pep) and not in_range("2.1.1", events, pep)
    assert in_range("0.1", [{"introduced": "0"}], pep)  # no fix yet: everything affected
    assert in_range("1.0rc1", [{"introduced": "0"}, {"fixed": "1.0"}], pep)  # PEP 440 pre-release < final
    semver = comparator("npm", "SEMVER")
    assert in_range("1.2.3-beta", [{"introduced": "1.2.0"}, {"fixed": "1.2.3"}], semver)


def test_cvss_scores() -> None:
    assert cvss3_score(CRITICAL) == 9.8
    assert cvss3_score(MEDIUM) == 6.1
    assert cvss3_score("CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:N/I:N/A:L") == 1.8
    assert cvss3_score("CVSS:3.0/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N") == 5.5
    assert cvss3_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H") == 10.0
    assert cvss2_score("AV:N/AC:L/Au:N/C:P/I:P/A:P") == 7.5
    assert advisory_severity({"severity": [{"type": "CVSS_V3", "score": CRITICAL}]})[0] == "critical"
    assert advisory_severity({"database_specific": {"severity": "MODERATE"}})[0] == "medium"
    assert advisory_severity({})[0] is None


# --- matching ------------------------------------------------------------------------------------------
def test_flags_a_vulnerable_version_and_passes_a_clean_one(tmp_path: Path) -> None:
    db = AdvisoryDB.load(write_osv_layout(tmp_path, [
        advisory("GHSA-test-0001-0001", "Demo_Lib", [{"introduced": "0"}, {"fixed": "2.0.1"}]),
    ]))  # fmt: skip
    vulnerable = audit_document(sbom(lib("demo-lib", "2.0.0")), db)
    assert [f.advisory_id for f in vulnerable.findings] == ["GHSA-test-0001-0001"]
    assert vulnerable.findings[0].fixed == ["2.0.1"] and vulnerable.failed
    clean = audit_document(sbom(lib("demo-lib", "2.0.1")), db)
    assert clean.findings == [] and not clean.failed


def test_versions_list_and_withdrawn_and_other_ecosystems(tmp_path: Path) -> None:
    advs = [
        advisory("PYSEC-2099-1", "listed", [], versions=["1.5", "1.6"]),
        advisory("PYSEC-2099-2", "gone", [{"introduced": "0"}], withdrawn="2025-02-01T00:00:00Z"),
    ]
    write_osv_layout(tmp_path, advs)
    write_osv_layout(tmp_path, [advisory("DSA-9999-1", "libdemo1", [{"introduced": "0"}, {"fixed": "1.2-1"}],
                                         eco="Debian:12")], ecosystem="Debian")  # fmt: skip
    db = AdvisoryDB.load(tmp_path)
    assert db.count == 2  # the withdrawn one is skipped
    deb = {"type": "library", "name": "libdemo1", "version": "1.2-1~deb12u1", "bom-ref": "d",
           "purl": "pkg:deb/debian/libdemo1@1.2-1~deb12u1?arch=amd64&distro=debian-12"}
    rep = audit_document(sbom(lib("listed", "1.5"), lib("listed2", "1.5"), lib("gone", "1.0"), deb), db)
    assert sorted(f.advisory_id for f in rep.findings) == ["DSA-9999-1", "PYSEC-2099-1"]


def test_os_packages_match_advisories_by_source_package(tmp_path: Path) -> None:
    """Debian's OSV records name the source package (openssl), the SBOM the binary one (libssl3)."""
    write_osv_layout(tmp_path, [advisory("DSA-9998-1", "openssl", [{"introduced": "0"}, {"fixed": "3.0.15-1~deb12u1"}],
                                         eco="Debian:12")], ecosystem="Debian")  # fmt: skip
    write_osv_layout(tmp_path, [advisory("OESA-2099-1", "openssl", [{"introduced": "0"}, {"fixed": "3.0.12-6.oe2203"}],
                                         eco="openEuler:22.03-LTS")], ecosystem="openEuler")  # fmt: skip
    db = AdvisoryDB.load(tmp_path)
    deb = {"type": "library", "name": "libssl3", "version": "3.0.11-1~deb12u2", "bom-ref": "d",
           "purl": "pkg:deb/debian/libssl3@3.0.11-1~deb12u2?arch=amd64&distro=debian-12",
           "properties": [{"name": "xcstack:source-package", "value": "openssl"}]}
    rpm = {"type": "library", "name": "openssl-libs", "version": "3.0.12-5.oe2203", "bom-ref": "r",
           "purl": "pkg:rpm/openeuler/openssl-libs@3.0.12-5.oe2203?arch=x86_64&distro=openeuler-22.03",
           "properties": [{"name": "xcstack:source-package", "value": "openssl-3.0.12-5.oe2203.src.rpm"}]}
    rep = audit_document(sbom(deb, rpm), db)
    assert sorted(f.advisory_id for f in rep.findings) == ["DSA-9998-1", "OESA-2099-1"]
    fixed = copy.deepcopy(deb)
    fixed["version"] = "3.0.15-1~deb12u1"
    fixed["purl"] = "pkg:deb/debian/libssl3@3.0.15-1~deb12u1?arch=amd64&distro=debian-12"
    assert audit_document(sbom(fixed), db).findings == []


def test_only_needed_ecosystems_are_loaded(tmp_path: Path) -> None:
    write_osv_layout(tmp_path, [advisory("PYSEC-1", "a", [{"introduced": "0"}])])
    (tmp_path / "npm").mkdir()
    (tmp_path / "npm" / "all.zip").write_bytes(b"not a zip")  # never opened: no npm component
    db = AdvisoryDB.load(tmp_path, ecosystems={"PyPI"})
    assert db.count == 1


def test_threshold_decides_the_exit_status(tmp_path: Path) -> None:
    write_osv_layout(tmp_path / "osv", [
        advisory("GHSA-medium-0000-0001", "demo-lib", [{"introduced": "0"}], vector=MEDIUM),
    ])  # fmt: skip
    doc = tmp_path / "app.cdx.json"
    doc.write_text(json.dumps(sbom(lib("demo-lib", "1.0"))))
    base = ["sbom", "--sbom", str(doc), "--audit", str(tmp_path / "osv")]
    assert main([*base, "--severity", "high"]) == 0  # medium finding under a high threshold: warn only
    assert main([*base, "--severity", "medium"]) == 1
    assert main([*base, "--severity", "low", "--ignore", "GHSA-medium-0000-0001"]) == 0
    report = tmp_path / "report.json"
    assert main([*base, "--severity", "medium", "--report", str(report)]) == 1
    data = json.loads(report.read_text())
    assert data["failed"] and data["vulnerabilities"][0]["severity"] == "medium"


def test_audit_path_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_osv_layout(tmp_path / "osv", [advisory("GHSA-cfg-0000-0001", "demo-lib", [{"introduced": "0"}])])
    doc = tmp_path / "app.cdx.json"
    doc.write_text(json.dumps(sbom(lib("demo-lib", "1.0"))))
    assert main(["sbom", "--sbom", str(doc), "--audit"]) == 2  # no [supply] advisories configured
    monkeypatch.setenv("XC_SUPPLY__ADVISORIES", str(tmp_path / "osv"))
    assert main(["sbom", "--sbom", str(doc), "--audit"]) == 1


def test_unknown_severity_uses_the_configured_default(tmp_path: Path) -> None:
    db = AdvisoryDB.load(write_osv_layout(tmp_path, [advisory("OSV-1", "x", [{"introduced": "0"}], vector=None)]))
    assert audit_document(sbom(lib("x", "1")), db, unknown_severity="high").failed
    assert not audit_document(sbom(lib("x", "1")), db, unknown_severity="low").failed


def test_bad_advisory_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "app.cdx.json"
    doc.write_text(json.dumps(sbom(lib("x", "1"))))
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 broken")
    assert main(["sbom", "--sbom", str(doc), "--audit", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "osv" / "PyPI").mkdir(parents=True)
    (tmp_path / "osv" / "PyPI" / "x.json").write_text("{broken")
    assert main(["sbom", "--sbom", str(doc), "--audit", str(tmp_path / "osv")]) == 2


def test_audit_of_the_real_venv_flags_the_installed_version(tmp_path: Path, cdx: dict[str, Any]) -> None:
    """A fixture advisory against the installed `packaging` is found in the generated SBOM."""
    import importlib.metadata as md

    installed = md.version("packaging")
    write_osv_layout(tmp_path, [
        advisory("GHSA-fixture-pack-0001", "packaging", [{"introduced": "0"}, {"fixed": installed + ".post999"}]),
        advisory("GHSA-fixture-pack-0002", "packaging", [{"introduced": "0"}, {"fixed": "0.1"}]),
    ])  # fmt: skip
    db = AdvisoryDB.load(tmp_path)
    rep = audit_document(cdx, db, threshold="critical")
    assert [f.advisory_id for f in rep.findings] == ["GHSA-fixture-pack-0001"]
    assert rep.failed
    assert rep.components > 100


# --- licenses ------------------------------------------------------------------------------------------
def test_license_normalisation() -> None:
    from email.message import Message

    m = Message()
    m["License-Expression"] = "mit or apache-2.0"
    assert normalise(m).expression == "MIT OR Apache-2.0"
    m2 = Message()
    m2["Classifier"] = "License :: OSI Approved :: Apache Software License"
    assert normalise(m2) == LicenseInfo("Apache-2.0", None, "classifier")
    m3 = Message()
    m3["License"] = "Copyright (c) 2020 someone\nPermission is hereby granted..."
    m3["Classifier"] = "License :: OSI Approved :: MIT License"
    assert normalise(m3).expression == "MIT"
    assert spdx_expression("GPL 3 please") is None


def test_license_policy_denies_a_denied_license() -> None:
    pol = LicensePolicy(deny=["GPL-3.0*", "AGPL-*"])
    assert pol.check("GPL-3.0-only").verdict == "denied"
    assert pol.check("AGPL-3.0-or-later").verdict == "denied"
    assert pol.check("MIT").verdict == "allowed"
    assert pol.check("MIT OR GPL-3.0-only").verdict == "allowed"  # a permitted choice exists
    assert pol.check("MIT AND GPL-3.0-only").verdict == "denied"  # both apply
    assert pol.check("GPL-2.0-or-later WITH Classpath-exception-2.0").verdict == "allowed"
    assert pol.check(None).verdict == "unknown"
    allow = LicensePolicy(allow=["MIT", "Apache-2.0", "BSD-*"])
    assert allow.check("BSD-3-Clause").verdict == "allowed"
    assert allow.check("MPL-2.0").verdict == "denied"


def test_license_policy_in_the_audit_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = sbom(lib("ok", "1", "MIT"), lib("copyleft", "1", "GPL-3.0-only"), lib("nolicense", "1", None))
    rep = audit_document(doc, None, policy=LicensePolicy(deny=["GPL-3.0*"]))
    assert [lf.name for lf in rep.denied_licenses] == ["copyleft"] and rep.failed
    strict = audit_document(doc, None, policy=LicensePolicy(deny=["GPL-3.0*"]), unknown_license="deny")
    assert sorted(lf.name for lf in strict.denied_licenses) == ["copyleft", "nolicense"]
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    assert main(["sbom", "--sbom", str(path), "--license-deny", "GPL-3.0*"]) == 1
    assert "copyleft" in capsys.readouterr().out
    assert main(["sbom", "--sbom", str(path), "--license-deny", "AGPL-*"]) == 0


def test_purl_mapping() -> None:
    c = purl_component("r", "pkg:pypi/Foo_Bar@1.0")
    assert c is not None and (c.ecosystem, c.name) == ("PyPI", "foo-bar")
    d = purl_component("r", "pkg:deb/debian/libssl3@3.0.11-1~deb12u2?arch=amd64&distro=debian-12")
    assert d is not None and d.ecosystem == "Debian:12"
    assert purl_component("r", "pkg:pypi/noversion") is None
