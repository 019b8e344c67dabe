"""The files of an audit chain: segment and seal names, listing, reading (also compressed), the
writer's lock. Shared by the writer (log.py) and the verifier (verify.py), which import it and not
each other."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

SEGMENT_RE = re.compile(r"^seg-(\d{12})\.log(\.gz)?$")
SEAL_SUFFIX = ".seal"
CHECKPOINTS = "checkpoints.log"

def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:012d}.log"


def list_segments(chain_dir: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of each segment in order; a closed segment may be compressed (`.log.gz`).
    When both exist (a crash between compressing and removing the original) the original wins."""
    found: dict[int, Path] = {}
    for p in chain_dir.iterdir() if chain_dir.is_dir() else ():
        m = SEGMENT_RE.match(p.name)
        if m:
            first = int(m.group(1))
            if first not in found or not m.group(2):
                found[first] = p
    return sorted(found.items())


def read_segment(path: Path) -> bytes:
    """A segment's record lines, decompressed when it is a sealed `.log.gz`."""
    if path.name.endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def seal_path(segment: Path) -> Path:
    return segment.with_name(segment.name.split(".", 1)[0] + SEAL_SUFFIX)


def list_chains(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chain_is_live(chain_dir: Path) -> bool:
    """True when a process holds the chain's writer lock."""
    lock = chain_dir / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
