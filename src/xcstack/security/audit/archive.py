"""Export sealed audit segments to an archive directory, verifiable offline.

An archive holds, per chain, `<dest>/<chain>/`: the closed segments up to the newest sealed one
(compressed `.log.gz` as they are kept, or plain `.log` when not compressed yet), their seals
(`seg-N.seal`), and the chain's checkpoints up to the last exported record (`checkpoints.log`).
`xcstack audit verify --archive DIR` (`verify.verify_archive`) checks the hash chain across the
archived segments and every seal and checkpoint signature with public keys only; the archive's last
record is always covered by a seal. Exports are incremental: files already there with the same
size are not copied again, so a cron job can export into the same directory every day, and the
archive keeps what retention later prunes from the live directory.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from xcstack.security.audit import record as rec
from xcstack.security.audit.files import CHECKPOINTS, fsync_dir, list_segments, seal_path


@dataclass
class ArchiveReport:
    chain: str
    copied: list[str] = field(default_factory=list)
    kept: int = 0  # files already in the archive
    last_seq: int = 0  # the last record the archive now holds (0: nothing sealed to export)


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, dst)


def export_chain(chain_dir: Path, dest_root: Path) -> ArchiveReport:
    """Copy one chain's sealed segments (blocking). Segments after the newest seal stay out: their
    records are not yet covered by a signature the archive could carry."""
    report = ArchiveReport(chain_dir.name)
    segs = list_segments(chain_dir)
    sealed = [i for i, (_, p) in enumerate(segs) if seal_path(p).exists()]
    if not sealed:
        return report
    out = dest_root / chain_dir.name
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for _, path in segs[: sealed[-1] + 1]:
        for src in (path, seal_path(path)):
            if not src.exists():  # an unsealed segment between sealed ones: later seals cover it
                continue
            dst = out / src.name
            if dst.exists() and dst.stat().st_size == src.stat().st_size:
                report.kept += 1
                continue
            _copy(src, dst)
            report.copied.append(src.name)
        if path.name.endswith(".gz"):  # exported plain before, compressed since: keep one copy
            (out / path.name.removesuffix(".gz")).unlink(missing_ok=True)
    last = rec.loads(seal_path(segs[sealed[-1]][1]).read_bytes())
    report.last_seq = int(last["seq"])
    # the checkpoints up to the archive's last record (later ones name records it does not hold), and
    # a copy of every seal: cutting segments off the archive's end together with their seal files
    # still leaves a signed checkpoint naming a record past the end
    lines: dict[bytes, int] = {}
    cps = chain_dir / CHECKPOINTS
    sources: list[bytes] = [*(cps.read_bytes().split(b"\n") if cps.exists() else ()),
               *(seal_path(p).read_bytes().strip() for _, p in segs[: sealed[-1] + 1] if seal_path(p).exists())]
    for line in sources:
        try:
            seq = int(rec.loads(line)["seq"]) if line else 0
        except Exception:  # a torn or malformed line is not exported
            continue
        if 0 < seq <= report.last_seq:
            lines[line + b"\n"] = seq
    tmp = out / (CHECKPOINTS + ".tmp")
    ordered: list[bytes] = sorted(lines, key=lambda k: lines[k])
    tmp.write_bytes(b"".join(ordered))
    os.chmod(tmp, 0o600)
    os.replace(tmp, out / CHECKPOINTS)
    fsync_dir(out)
    return report
