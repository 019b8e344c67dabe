"""`Blocked`: a block action matched. Its own light module, so that the gateway can catch it without
importing the detectors (ahocorasick_rs, numpy, OpenCC)."""

from __future__ import annotations

from typing import Any


class Blocked(Exception):
    """The request (direction "input") or the answer ("output") is refused; `finding` says which
    policy, detector and category (never the matched text)."""

    def __init__(self, finding: Any, direction: str) -> None:
        super().__init__(f"content blocked ({direction}): category {finding.category}")
        self.finding = finding
        self.direction = direction
