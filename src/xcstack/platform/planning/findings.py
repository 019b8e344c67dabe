"""What the planning phases report besides the plan itself: notes, warnings and which settings overrode it.

One object passed through every phase in order, so the lists keep the order operators have always seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Findings:
    """Appended to by each phase; `derive_plan` copies the lists into the TuningPlan."""

    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
