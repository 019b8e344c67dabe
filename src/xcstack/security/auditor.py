"""The security service's audit writer: one call shape for every part, whether or not a log is attached."""

from __future__ import annotations

from typing import Any

from xcstack.security.audit.log import AuditLog
from xcstack.security.principal import ReqInfo


class Auditor:
    """Writes security events and data-plane call records; a no-op while no audit log is attached."""

    def __init__(self, log: AuditLog | None = None) -> None:
        self.log = log

    async def __call__(
        self,
        actor: str,
        action: str,
        resource: str,
        outcome: str,
        info: ReqInfo | None = None,
        detail: dict[str, Any] | None = None,
        *,
        data_plane: bool = False,
    ) -> None:
        """Write one audit record. Security events (the default) are durable before this returns;
        `data_plane` call records are queued in order and made durable within the configured window
        (`[security.audit] durability`, docs/security.md)."""
        if self.log is None:
            return
        info = info or ReqInfo()
        append = self.log.append_call if data_plane else self.log.append
        await append(actor=actor, action=action, resource=resource, outcome=outcome, ip=info.ip,
                     request_id=info.request_id, detail=detail)
