"""`xcstack sbom --diff OLD.cdx.json`: what changed in the installation since an earlier SBOM.

Components are matched by (type, name) at the top level and by (owner, path) for nested files (loaded
libraries, model files, `--files` entries). Reported: added, removed, version changed, and — the one that
matters most for integrity — **content changed at the same version** (a distribution whose RECORD-based
hash differs, a library or model file whose SHA-256 differs), which a package upgrade does not explain.
Run-specific facts (pids, timestamps, serial numbers) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Change:
    kind: str  # added | removed | version | content
    key: str
    old: str = ""
    new: str = ""


@dataclass
class DiffReport:
    changes: list[Change] = field(default_factory=list)

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def render(self) -> str:
        lines = []
        marks = {"added": "+", "removed": "-", "version": "~", "content": "!"}
        for c in sorted(self.changes, key=lambda c: ("content version added removed".split().index(c.kind), c.key)):
            detail = f" {c.old} -> {c.new}" if c.kind in ("version", "content") else (f" {c.new or c.old}")
            lines.append(f"{marks[c.kind]} {c.kind:8} {c.key}{detail}")
        lines.append(
            f"diff: {len(self.of('content'))} changed in place, {len(self.of('version'))} version change(s), "
            f"{len(self.of('added'))} added, {len(self.of('removed'))} removed"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"changed": self.changed,
                "changes": [{"kind": c.kind, "key": c.key, "old": c.old, "new": c.new} for c in self.changes]}


def _sha256(c: dict[str, Any]) -> str:
    for h in c.get("hashes") or []:
        if h.get("alg") == "SHA-256":
            return str(h.get("content", ""))
    return ""


def index(doc: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """key -> (version, sha256, owner key) for every component; nested files keyed under their owner."""
    out: dict[str, tuple[str, str, str]] = {}

    def walk(items: list[dict[str, Any]], owner: str) -> None:
        for c in items:
            is_file = c.get("type") == "file"
            key = f"file {owner} {c.get('name')}" if is_file else f"{c.get('type')}:{c.get('name')}"
            out[key] = (str(c.get("version") or ""), _sha256(c), owner if is_file else "")
            walk(c.get("components") or [], owner if is_file else key)

    root = (doc.get("metadata") or {}).get("component")
    if root:
        walk([root], "")
    walk(doc.get("components") or [], "")
    return out


def diff_documents(old: dict[str, Any], new: dict[str, Any]) -> DiffReport:
    a, b = index(old), index(new)
    rep = DiffReport()
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            rep.changes.append(Change("removed", key, old=a[key][0]))
            continue
        if key not in a:
            rep.changes.append(Change("added", key, new=b[key][0]))
            continue
        (va, ha, owner), (vb, hb, _) = a[key], b[key]
        if owner:  # a nested file: changes with an upgraded owner are explained by the upgrade
            if ha and hb and ha != hb and not (owner in a and owner in b and a[owner][0] != b[owner][0]):
                rep.changes.append(Change("content", key, ha[:16], hb[:16]))
        elif va != vb:
            rep.changes.append(Change("version", key, va, vb))
        elif ha and hb and ha != hb:
            rep.changes.append(Change("content", key, ha[:16], hb[:16]))
    return rep
