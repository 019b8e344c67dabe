"""Who is acting: the principal a request runs as, and the request facts an audit record names.

Kept apart from the security service so that routes, middleware and the service's parts share these
small values without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    roles: tuple[str, ...]
    kind: str = "user"  # user | api_key | system
    session: str | None = None  # token hash of the session
    restricted: str | None = None  # None | password_change | totp_enrollment
    owner_id: str | None = None  # an API key's user: what it may not do to itself, its key may not either
    group: str | None = None  # the user's group, or the key's own (else its owner's): usage quotas and reports

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "roles": list(self.roles), "kind": self.kind,
                "restricted": self.restricted}


#: The in-process actor of provisioning code and tests (never reachable through HTTP).
SYSTEM = Principal("system", "system", (), kind="system")


@dataclass
class ReqInfo:
    ip: str | None = None
    request_id: str | None = None
