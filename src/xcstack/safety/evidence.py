"""Evidence of every block, mask and flag: an audit record in the SM3 chain, and metrics.

A record names the policy, detector, category, list and its sha256, direction, offsets, request id and
key, and carries an HMAC-SM3 of the matched text under the evidence key: who holds the key can check
whether a given text was the match; the record itself never holds the text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from xcstack.safety.engine import STRENGTH, Finding

FINDINGS = Counter("xc_safety_findings_total", "Content-safety matches by category, action and direction",
                   ["category", "action", "direction"])

# (action, resource, outcome, detail): the security audit sink of the request (`security.guard.audit`)
AuditFn = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Where:
    """The request a finding belongs to."""

    request_id: str | None
    key: str
    model: str
    route: str


def finding_detail(f: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": f.policy, "detector": f.detector, "category": f.category, "action": f.action,
                           "start": f.start, "end": f.end, "hmac_sm3": f.mac}
    if f.field:
        out["field"] = f.field
    if f.list_sha256 is not None:
        out["list_sha256"] = f.list_sha256
    return out


async def record(findings: list[Finding], direction: str, where: Where,
                 audit: AuditFn | None) -> None:
    """One audit record for the findings of one check (counted in metrics even without an audit log)."""
    if not findings:
        return
    for f in findings:
        FINDINGS.labels(f.category, f.action, direction).inc()
    if audit is None:
        return
    outcome = max((f.action for f in findings), key=STRENGTH.__getitem__)
    detail = {"direction": direction, "request_id": where.request_id, "key": where.key, "route": where.route,
              "findings": [finding_detail(f) for f in findings]}
    await audit(f"safety.{direction}", f"model:{where.model}", outcome, detail)
