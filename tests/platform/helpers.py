from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "platform"


def fx(name: str) -> Path:
    root = FIXTURES / name
    assert root.is_dir(), f"missing fixture tree {root}"
    return root
