"""Inventory -> SPDX 2.3 JSON (built with spdx-tools' model; validated; written by its JSON writer).

Packages: the installation (DESCRIBES), every Python distribution, the interpreter, the OS, the
hardware platform, OS packages owning loaded libraries, models. Files: every loaded native library and
every model file (SHA-1 as SPDX requires, plus SHA-256). Relationships: DEPENDS_ON from Requires-Dist;
the installation DYNAMIC_LINKs each loaded library; a library file is tied to the package that installed
it with OTHER ("installed by") because SPDX reserves CONTAINS for packages whose files were all analysed
(which needs SHA-1 of every installed file). SM3 digests are annotations (SPDX has no SM3 algorithm).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from spdx_tools.common.spdx_licensing import spdx_licensing
from spdx_tools.spdx.model import (
    Actor,
    ActorType,
    Annotation,
    AnnotationType,
    Checksum,
    ChecksumAlgorithm,
    CreationInfo,
    Document,
    ExternalPackageRef,
    ExternalPackageRefCategory,
    ExtractedLicensingInfo,
    File,
    FileType,
    Package,
    PackagePurpose,
    Relationship,
    RelationshipType,
    SpdxNoAssertion,
)

from xcstack.supply.cyclonedx import os_purl
from xcstack.supply.inventory import FileEntry, Inventory, NativeLib, Party, tree_hash
from xcstack.supply.licenses import LicenseInfo

_ID_BAD = re.compile(r"[^A-Za-z0-9.\-]+")
_REF_IN_EXPR = re.compile(r"LicenseRef-[A-Za-z0-9.\-]+")


def _sid(*parts: str) -> str:
    return "SPDXRef-" + "-".join(_ID_BAD.sub("-", p).strip("-") or "x" for p in parts)


def _actor(party: Party | None, kind: ActorType = ActorType.ORGANIZATION) -> Actor | SpdxNoAssertion:
    if party is None:
        return SpdxNoAssertion()
    name = party.name.replace("(", "[").replace(")", "]").strip() or "unknown"
    return Actor(kind, name, party.email)


class _Licenses:
    def __init__(self) -> None:
        self.extracted: dict[str, ExtractedLicensingInfo] = {}

    def expr(self, info: LicenseInfo) -> Any:
        if info.expression:
            for ref in _REF_IN_EXPR.findall(info.expression):
                self._extract(ref, ref[len("LicenseRef-") :].replace("-", " "))
            try:
                return spdx_licensing.parse(info.expression)
            except Exception:
                return SpdxNoAssertion()
        if info.name:
            ref = "LicenseRef-" + (_ID_BAD.sub("-", info.name).strip("-")[:60] or "unnamed")
            self._extract(ref, info.name)
            return spdx_licensing.parse(ref)
        return SpdxNoAssertion()

    def _extract(self, ref: str, text: str) -> None:
        if ref not in self.extracted:
            self.extracted[ref] = ExtractedLicensingInfo(
                license_id=ref, extracted_text=text, license_name=text[:200],
                comment="license named in package metadata; no SPDX identifier matches it",
            )


def build_document(inv: Inventory, *, supplier: str, tool_version: str = "0") -> Document:
    plat = inv.platform
    created = inv.timestamp
    tool = Actor(ActorType.TOOL, f"xcstack-sbom-{tool_version}")
    creation = CreationInfo(
        spdx_version="SPDX-2.3",
        spdx_id="SPDXRef-DOCUMENT",
        name=f"xcstack installation on {plat.hostname or 'host'}",
        document_namespace=f"https://spdx.org/spdxdocs/xcstack-{uuid.uuid4()}",
        creators=[tool, Actor(ActorType.PERSON, inv.author), Actor(ActorType.ORGANIZATION, supplier)],
        created=created,
        creator_comment=f"Generated from the running installation (pids {', '.join(map(str, inv.pids))}).",
    )
    lic = _Licenses()
    packages: list[Package] = []
    files: list[File] = []
    rels: list[Relationship] = []
    annotations: list[Annotation] = []

    def sm3_note(spdx_id: str, digest: str) -> None:
        if digest:
            annotations.append(Annotation(spdx_id, AnnotationType.OTHER, tool, created, f"SM3: {digest}"))

    pkg_ids: dict[str, str] = {}
    root_id = "SPDXRef-xcstack-installation"
    root_dist = inv.dists.get(inv.root_key) if inv.root_key else None
    for key, d in inv.dists.items():
        sid = root_id if key == inv.root_key else _sid("pypi", key)
        pkg_ids[key] = sid
        packages.append(Package(
            spdx_id=sid,
            name=d.name,
            download_location=SpdxNoAssertion(),
            version=d.version,
            supplier=_actor(d.supplier) if d.supplier else (
                Actor(ActorType.ORGANIZATION, supplier) if key == inv.root_key else SpdxNoAssertion()),
            originator=_actor(d.authors[0], ActorType.PERSON) if d.authors else None,
            files_analyzed=False,
            checksums=[Checksum(ChecksumAlgorithm.SHA256, d.tree_hash)] if d.tree_hash else [],
            homepage=d.homepage if d.homepage and d.homepage.startswith(("http://", "https://")) else None,
            license_concluded=SpdxNoAssertion(),
            license_declared=lic.expr(d.license),
            copyright_text=SpdxNoAssertion(),
            summary=d.summary[:1000] or None,
            external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl", d.purl)],
            primary_package_purpose=PackagePurpose.APPLICATION if key == inv.root_key else PackagePurpose.LIBRARY,
            comment=(f"SHA-256 is dirhash-h1 over the {len(d.files)} RECORD entries; RECORD sha256 "
                     f"{d.record_sha256}") if d.tree_hash else None,
        ))
    if root_dist is None:
        packages.append(Package(spdx_id=root_id, name="python-environment", download_location=SpdxNoAssertion(),
                                supplier=Actor(ActorType.ORGANIZATION, supplier), files_analyzed=False,
                                primary_package_purpose=PackagePurpose.APPLICATION))
    rels.append(Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, root_id))
    for key, d in inv.dists.items():
        for dep in d.depends_on:
            if dep in pkg_ids:
                rels.append(Relationship(pkg_ids[key], RelationshipType.DEPENDS_ON, pkg_ids[dep]))

    it = inv.interpreter
    interp_id = _sid("interpreter", it.implementation, it.version)
    packages.append(Package(
        spdx_id=interp_id, name=it.implementation.lower(), download_location=SpdxNoAssertion(), version=it.version,
        supplier=Actor(ActorType.ORGANIZATION, "Python Software Foundation"), files_analyzed=False,
        checksums=[Checksum(ChecksumAlgorithm.SHA256, it.sha256)] + (
            [Checksum(ChecksumAlgorithm.SHA1, it.sha1)] if it.sha1 else []),
        license_declared=spdx_licensing.parse("PSF-2.0") if it.implementation == "CPython" else SpdxNoAssertion(),
        license_concluded=SpdxNoAssertion(), copyright_text=SpdxNoAssertion(),
        external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl",
                                                f"pkg:generic/{it.implementation.lower()}@{it.version}")],
        primary_package_purpose=PackagePurpose.APPLICATION, comment=f"binary {it.path}",
    ))
    sm3_note(interp_id, it.sm3)
    rels.append(Relationship(root_id, RelationshipType.DEPENDS_ON, interp_id))

    os_id = _sid("os", plat.os_id, plat.os_version or "unknown")
    packages.append(Package(
        spdx_id=os_id, name=plat.os_id, download_location=SpdxNoAssertion(), version=plat.os_version or None,
        supplier=Actor(ActorType.ORGANIZATION, plat.os_name or plat.os_id), files_analyzed=False,
        primary_package_purpose=PackagePurpose.OPERATING_SYSTEM, summary=plat.os_pretty or None,
        comment=f"kernel {plat.kernel}; arch {plat.arch}; family {plat.os_family}",
    ))
    hw_id = _sid("platform", plat.arch)
    packages.append(Package(
        spdx_id=hw_id, name=plat.arch, download_location=SpdxNoAssertion(),
        supplier=Actor(ActorType.ORGANIZATION, plat.cpu_vendor or "unknown"), files_analyzed=False,
        primary_package_purpose=PackagePurpose.DEVICE, summary=plat.cpu_model or None,
    ))
    rels.append(Relationship(interp_id, RelationshipType.DEPENDS_ON, os_id))
    rels.append(Relationship(root_id, RelationshipType.DEPENDS_ON, os_id))
    rels.append(Relationship(os_id, RelationshipType.DEPENDS_ON, hw_id))

    os_pkg_ids: dict[str, str] = {}
    for lib in inv.native_libs:
        if lib.path == it.path or not lib.sha1 or not lib.sha256:
            continue
        fid = _sid("file", lib.path)
        files.append(File(name="." + lib.path if lib.path.startswith("/") else lib.path, spdx_id=fid,
                          checksums=[Checksum(ChecksumAlgorithm.SHA1, lib.sha1),
                                     Checksum(ChecksumAlgorithm.SHA256, lib.sha256)],
                          file_types=[FileType.BINARY], license_concluded=SpdxNoAssertion(),
                          copyright_text=SpdxNoAssertion(), comment="loaded by the running process"))
        rels.append(Relationship(root_id, RelationshipType.DYNAMIC_LINK, fid))
        owner = _lib_owner(lib, pkg_ids, os_pkg_ids, packages, plat, lic)
        if owner:
            rels.append(Relationship(fid, RelationshipType.OTHER, owner, comment="installed by"))

    for m in inv.models:
        mid = _sid("model", m.name)
        th = tree_hash(FileEntry(f.path, f.sha256, f.size) for f in m.files)
        packages.append(Package(
            spdx_id=mid, name=m.name, download_location=SpdxNoAssertion(), version=m.version,
            supplier=SpdxNoAssertion(), files_analyzed=False,
            checksums=[Checksum(ChecksumAlgorithm.SHA256, th)] if th else [],
            license_declared=lic.expr(m.license), license_concluded=SpdxNoAssertion(),
            copyright_text=SpdxNoAssertion(), primary_package_purpose=PackagePurpose.OTHER,
            comment=f"machine-learning model at {m.path}",
        ))
        rels.append(Relationship(root_id, RelationshipType.DEPENDS_ON, mid))
        for f in m.files:
            fid = _sid("model", m.name, f.path)
            files.append(File(name="./" + f.path, spdx_id=fid,
                              checksums=[Checksum(ChecksumAlgorithm.SHA1, f.sha1),
                                         Checksum(ChecksumAlgorithm.SHA256, f.sha256)],
                              license_concluded=SpdxNoAssertion(), copyright_text=SpdxNoAssertion(),
                              comment=f"file of model {m.name}"))
            rels.append(Relationship(fid, RelationshipType.OTHER, mid, comment="file of model"))
            sm3_note(fid, f.sm3)
    return Document(creation_info=creation, packages=packages, files=files, relationships=rels,
                    annotations=annotations, extracted_licensing_info=list(lic.extracted.values()))


def _lib_owner(lib: NativeLib, pkg_ids: dict[str, str], os_pkg_ids: dict[str, str], packages: list[Package],
               plat: Any, lic: _Licenses) -> str | None:
    if lib.py_dist and lib.py_dist in pkg_ids:
        return pkg_ids[lib.py_dist]
    pkg = lib.os_package
    if pkg is None:
        return None
    key = f"{pkg.name}:{pkg.arch}"
    if key not in os_pkg_ids:
        sid = _sid("ospkg", pkg.name, pkg.arch)
        os_pkg_ids[key] = sid
        from email.utils import parseaddr

        mname, maddr = parseaddr(pkg.maintainer)
        packages.append(Package(
            spdx_id=sid, name=pkg.name, download_location=SpdxNoAssertion(), version=pkg.version,
            supplier=Actor(ActorType.ORGANIZATION, (plat.os_name or plat.os_id or "unknown OS")),
            originator=Actor(ActorType.PERSON, (mname or maddr).replace("(", "[").replace(")", "]"), maddr or None)
            if (mname or maddr) else None,
            files_analyzed=False, license_declared=lic.expr(pkg.license), license_concluded=SpdxNoAssertion(),
            copyright_text=SpdxNoAssertion(),
            homepage=pkg.homepage if pkg.homepage.startswith(("http://", "https://")) else None,
            external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl",
                                                    os_purl(pkg, plat.os_id, plat.os_version))],
            primary_package_purpose=PackagePurpose.LIBRARY, source_info=f"source package {pkg.source}"
            if pkg.source else None,
        ))
    return os_pkg_ids[key]


def to_json(document: Document) -> str:
    """Serialise with spdx-tools' converter (the same as its JSON writer, without the file)."""
    import json

    from spdx_tools.spdx.document_utils import create_document_without_duplicates
    from spdx_tools.spdx.jsonschema.document_converter import DocumentConverter

    doc = create_document_without_duplicates(document)
    data = DocumentConverter().convert(doc)
    return json.dumps(data, indent=2, ensure_ascii=False)


def namespace_digest(text: str) -> str:  # pragma: no cover - helper for reproducible names
    return hashlib.sha256(text.encode()).hexdigest()[:16]
