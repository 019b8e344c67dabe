"""Role-based access control with 三权分立 (separation of the three administrators).

A permission is a pair of glob patterns `(resource, action)`. Resources are namespaced:
`route:/v1/chat/completions` (an HTTP route, by its path template), `model:qwen2-7b`,
`query:monthly_sales` (a named query), `collection:docs`, `key:audit-sm2`, `audit`,
`security.user`, `security.role`, `security.apikey`, `config`. Actions are verbs (`read`, `write`,
`invoke`, `verify`, ... or an HTTP method in lower case for `route:` resources).

Deny by default: a principal may do something only when one of its roles allows it and none
denies it. Built-in roles:

- `sysadmin`  — system administration: config, users, API keys, every capability's resources;
  cannot read, verify or alter the audit log, and cannot change roles or assign them.
- `secadmin`  — security administration: roles, role assignment, security policy; nothing else.
- `auditor`   — reads and verifies the audit log; nothing else.

Custom roles (created by secadmin) may hold any permission except on `audit` and `security.*`, so
no custom role can undo the separation. A user may hold at most one of the three built-in roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

Perm = tuple[str, str]

BUILTIN_ADMIN_ROLES = ("sysadmin", "secadmin", "auditor")
RESERVED_PREFIXES = ("audit", "security.")


@dataclass(frozen=True)
class Role:
    name: str
    allow: tuple[Perm, ...]
    deny: tuple[Perm, ...] = ()
    builtin: bool = False
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "allow": [list(p) for p in self.allow], "deny": [list(p) for p in self.deny],
                "builtin": self.builtin, "description": self.description}


BUILTIN_ROLES: dict[str, Role] = {
    "sysadmin": Role(
        "sysadmin",
        allow=(("*", "*"),),
        deny=(("audit", "*"), ("audit.*", "*"), ("security.role", "*"), ("security.policy", "*")),
        builtin=True,
        description="system administrator: config, users, keys, services; no audit access, no role changes",
    ),
    "secadmin": Role(
        "secadmin",
        allow=(("security.role", "*"), ("security.policy", "*"), ("security.user", "read")),
        builtin=True,
        description="security administrator: roles, role assignment, policies",
    ),
    "auditor": Role(
        "auditor",
        allow=(("audit", "read"), ("audit", "verify"), ("audit", "export")),
        builtin=True,
        description="auditor: reads and verifies the audit log only",
    ),
}


def _match(perms: tuple[Perm, ...], resource: str, action: str) -> bool:
    return any(fnmatchcase(resource, r) and fnmatchcase(action, a) for r, a in perms)


def _decide(roles: tuple[Role, ...], resource: str, action: str) -> bool:
    if any(_match(r.deny, resource, action) for r in roles):
        return False
    return any(_match(r.allow, resource, action) for r in roles)


_DECISIONS: dict[tuple[tuple[Role, ...], str, str], bool] = {}
DECISIONS_MAX = 10_000  # a full table is dropped whole (distinct resources cannot grow it without bound)


def allowed(roles: list[Role], resource: str, action: str) -> bool:
    """Deny by default; any deny wins over any allow.

    Decisions are remembered by the roles' full value (name and every permission), the resource and
    the action: the glob matching runs per request otherwise (twice for a gateway call: route and
    model). A role that changes is a different key, so a remembered decision never outlives it."""
    key = (tuple(roles), resource, action)
    hit = _DECISIONS.get(key)
    if hit is None:
        hit = _decide(key[0], resource, action)
        if len(_DECISIONS) >= DECISIONS_MAX:
            _DECISIONS.clear()
        _DECISIONS[key] = hit
    return hit


_RESERVED_PROBES = ("audit", "audit.log", "security.user", "security.role", "security.apikey", "security.policy")


def check_custom_permissions(perms: list[Perm]) -> None:
    """Raise ValueError when a custom role's permission could reach `audit` or `security.*`."""
    for res, act in perms:
        if not res or not act:
            raise ValueError("resource and action must not be empty")
        if res.startswith(RESERVED_PREFIXES) or any(fnmatchcase(p, res) for p in _RESERVED_PROBES):
            raise ValueError(f"custom roles may not grant {res!r}: audit and security.* belong to the "
                             "built-in administrator roles (三权分立)")
