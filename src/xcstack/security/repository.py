"""Every SQL statement of the security service, over the state store; rows come back typed.

The parts above (accounts, sessions, API keys, roles) decide; this module only reads and writes, so the
schema (`store.py`) and the statements that depend on it change in one place. Statements that must
hold together (a password change and the sessions it ends) run in one transaction here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xcstack.security.rbac import Perm, Role
from xcstack.security.store import MIGRATIONS
from xcstack.state.store import StateStore, Tx


def _strs(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


def _dump(items: Sequence[Any] | None) -> str | None:
    return None if items is None else json.dumps(list(items))


def _perms(text: str) -> tuple[Perm, ...]:
    return tuple((str(p[0]), str(p[1])) for p in json.loads(text))


@dataclass(frozen=True)
class UserRow:
    """One `sec_users` row; JSON columns parsed, flags as bools."""

    id: str
    name: str
    kind: str  # human | service
    roles: tuple[str, ...]
    pw_hash: str | None
    pw_changed_at: float
    must_change: bool
    disabled: bool
    totp_secret: str | None  # sealed, base64
    totp_enabled: bool
    totp_last_step: int
    recovery: tuple[str, ...] | None  # hashed recovery codes
    created_at: float
    pw_history: tuple[str, ...] | None  # newest first; None on rows older than the column
    group: str | None = None

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> UserRow:
        return cls(
            id=r["id"], name=r["name"], kind=r["kind"], roles=tuple(json.loads(r["roles"])), pw_hash=r["pw_hash"],
            pw_changed_at=float(r["pw_changed_at"]), must_change=bool(r["must_change"]),
            disabled=bool(r["disabled"]), totp_secret=r["totp_secret"], totp_enabled=bool(r["totp_enabled"]),
            totp_last_step=int(r["totp_last_step"]), recovery=_strs(r["recovery"]),
            created_at=float(r["created_at"]), pw_history=_strs(r.get("pw_history")), group=r.get("group_name"),
        )

    def as_record(self) -> dict[str, Any]:
        """The columns as stored (JSON text, 0/1 flags): what `SecurityService.get_user` has always returned."""
        return {
            "id": self.id, "name": self.name, "kind": self.kind, "roles": json.dumps(list(self.roles)),
            "pw_hash": self.pw_hash, "pw_changed_at": self.pw_changed_at, "must_change": int(self.must_change),
            "disabled": int(self.disabled), "totp_secret": self.totp_secret, "totp_enabled": int(self.totp_enabled),
            "totp_last_step": self.totp_last_step, "recovery": _dump(self.recovery), "created_at": self.created_at,
            "pw_history": _dump(self.pw_history), "group_name": self.group,
        }


@dataclass(frozen=True)
class NewUser:
    id: str
    name: str
    kind: str
    roles: tuple[str, ...]
    pw_hash: str
    must_change: bool
    created_at: float


@dataclass(frozen=True)
class SessionRow:
    """A session joined with its user (what authenticating a session token needs)."""

    user_id: str
    created_at: float
    last_seen: float
    restricted: str | None
    name: str
    roles: tuple[str, ...]
    disabled: bool
    group: str | None = None


@dataclass(frozen=True)
class ApiKeyRow:
    id: str
    name: str
    key_hash: str
    owner_id: str
    roles: tuple[str, ...]
    created_at: float
    expires_at: float
    revoked: bool
    group: str | None = None  # its own group; None: its owner's

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> ApiKeyRow:
        return cls(id=r["id"], name=r["name"], key_hash=r["key_hash"], owner_id=r["owner_id"],
                   roles=tuple(json.loads(r["roles"])), created_at=float(r["created_at"]),
                   expires_at=float(r["expires_at"]), revoked=bool(r["revoked"]), group=r.get("group_name"))


@dataclass(frozen=True)
class KeyWithOwner:
    key: ApiKeyRow
    owner_disabled: bool
    owner_group: str | None = None


class SecurityRepository:
    """Typed reads and writes of the `security` namespace of the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def migrate(self) -> None:
        await self.store.migrate("security", MIGRATIONS)

    # -- users ----------------------------------------------------------------------------------------
    async def insert_first_users(self, users: list[NewUser]) -> bool:
        """Insert `users` only while there is no user at all (first start); False when there was one."""

        def run(tx: Tx) -> bool:
            row = tx.fetchone("SELECT COUNT(*) AS n FROM sec_users")
            if row and int(row["n"]) > 0:
                return False
            for u in users:
                _insert_user(tx, u, with_history=False)
            return True

        return await self.store.transaction(run)

    async def insert_user(self, user: NewUser) -> bool:
        """False (nothing written) when the name is taken."""

        def run(tx: Tx) -> bool:
            if tx.fetchone("SELECT id FROM sec_users WHERE name = ?", (user.name,)):
                return False
            _insert_user(tx, user, with_history=True)
            return True

        return await self.store.transaction(run)

    async def user(self, name: str) -> UserRow | None:
        r = await self.store.fetchone("SELECT * FROM sec_users WHERE name = ?", (name,))
        return None if r is None else UserRow.from_record(r)

    async def users(self) -> list[UserRow]:
        return [UserRow.from_record(r) for r in await self.store.fetchall("SELECT * FROM sec_users ORDER BY name")]

    async def set_disabled(self, user_id: str, disabled: bool) -> None:
        """Disabling also ends every session of the user, in the same transaction."""

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET disabled = ? WHERE id = ?", (1 if disabled else 0, user_id))
            if disabled:
                tx.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user_id,))

        await self.store.transaction(run)

    async def delete_user(self, user_id: str) -> None:
        """The user goes; its sessions end and its API keys are revoked (kept for the record)."""

        def run(tx: Tx) -> None:
            for sql in ("DELETE FROM sec_sessions WHERE user_id = ?",
                        "UPDATE sec_api_keys SET revoked = 1 WHERE owner_id = ?", "DELETE FROM sec_users WHERE id = ?"):
                tx.execute(sql, (user_id,))

        await self.store.transaction(run)

    async def set_roles(self, user_id: str, roles: Sequence[str]) -> None:
        await self.store.execute("UPDATE sec_users SET roles = ? WHERE id = ?", (json.dumps(list(roles)), user_id))

    async def reset_password(self, user_id: str, pw_hash: str, now: float) -> None:
        """A one-time password (must be changed) and no session left."""

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET pw_hash = ?, pw_changed_at = ?, must_change = 1 WHERE id = ?",
                       (pw_hash, now, user_id))
            tx.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user_id,))

        await self.store.transaction(run)

    async def change_password(self, user_id: str, pw_hash: str, now: float, history: Sequence[str],
                              keep_session: str, restricted: str | None) -> None:
        """The new hash and history; every other session of the user ends, `keep_session` continues with
        `restricted` (None: unrestricted)."""

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET pw_hash = ?, pw_changed_at = ?, must_change = 0, pw_history = ? "
                       "WHERE id = ?", (pw_hash, now, json.dumps(list(history)), user_id))
            tx.execute("DELETE FROM sec_sessions WHERE user_id = ? AND token_hash <> ?", (user_id, keep_session))
            tx.execute("UPDATE sec_sessions SET restricted = ? WHERE token_hash = ?", (restricted, keep_session))

        await self.store.transaction(run)

    # -- TOTP -----------------------------------------------------------------------------------------
    async def set_totp_secret(self, user_id: str, sealed_b64: str) -> None:
        await self.store.execute("UPDATE sec_users SET totp_secret = ? WHERE id = ?", (sealed_b64, user_id))

    async def enable_totp(self, user_id: str, recovery_hashes: Sequence[str]) -> None:
        """TOTP on, recovery codes stored, and the user's sessions waiting for enrolment released."""

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET totp_enabled = 1, recovery = ? WHERE id = ?",
                       (json.dumps(list(recovery_hashes)), user_id))
            tx.execute("UPDATE sec_sessions SET restricted = NULL WHERE user_id = ? AND restricted = ?",
                       (user_id, "totp_enrollment"))

        await self.store.transaction(run)

    async def reset_totp(self, user_id: str) -> None:
        """TOTP off and forgotten; the user's sessions end."""

        def run(tx: Tx) -> None:
            tx.execute("UPDATE sec_users SET totp_enabled = 0, totp_secret = NULL, recovery = NULL, "
                       "totp_last_step = 0 WHERE id = ?", (user_id,))
            tx.execute("DELETE FROM sec_sessions WHERE user_id = ?", (user_id,))

        await self.store.transaction(run)

    async def advance_totp_step(self, user_id: str, step: int) -> bool:
        """Compare-and-set: True for the one caller that moved the last used step forward to `step`."""
        n = await self.store.execute(
            "UPDATE sec_users SET totp_last_step = ? WHERE id = ? AND totp_last_step < ?", (step, user_id, step))
        return n == 1

    async def replace_recovery(self, user_id: str, expected: Sequence[str], rest: Sequence[str]) -> bool:
        """Compare-and-set: True when the stored codes were still `expected` and are now `rest`."""
        n = await self.store.execute("UPDATE sec_users SET recovery = ? WHERE id = ? AND recovery = ?",
                                     (json.dumps(list(rest)), user_id, json.dumps(list(expected))))
        return n == 1

    # -- sessions -------------------------------------------------------------------------------------
    async def insert_session(self, th: str, user_id: str, now: float, restricted: str | None,
                             ip: str | None = None) -> None:
        await self.store.execute(
            "INSERT INTO sec_sessions (token_hash, user_id, created_at, last_seen, restricted, ip) "
            "VALUES (?, ?, ?, ?, ?, ?)", (th, user_id, now, now, restricted, ip))

    async def sessions(self) -> list[dict[str, Any]]:
        """Every stored session with its user's name (token hash, created, last seen, restriction, ip)."""
        return await self.store.fetchall(
            "SELECT s.token_hash, s.created_at, s.last_seen, s.restricted, s.ip, u.name, u.disabled "
            "FROM sec_sessions s JOIN sec_users u ON u.id = s.user_id ORDER BY s.created_at")

    async def session(self, th: str) -> SessionRow | None:
        r = await self.store.fetchone(
            "SELECT s.user_id, s.created_at, s.last_seen, s.restricted, u.name, u.roles, u.disabled, u.group_name "
            "FROM sec_sessions s JOIN sec_users u ON u.id = s.user_id WHERE s.token_hash = ?", (th,))
        if r is None:
            return None
        return SessionRow(user_id=r["user_id"], created_at=float(r["created_at"]), last_seen=float(r["last_seen"]),
                          restricted=r["restricted"], name=r["name"], roles=tuple(json.loads(r["roles"])),
                          disabled=bool(r["disabled"]), group=r["group_name"])

    async def delete_session(self, th: str) -> None:
        await self.store.execute("DELETE FROM sec_sessions WHERE token_hash = ?", (th,))

    async def touch_session(self, th: str, now: float) -> None:
        await self.store.execute("UPDATE sec_sessions SET last_seen = ? WHERE token_hash = ?", (now, th))

    # -- API keys -------------------------------------------------------------------------------------
    async def insert_api_key(self, key: ApiKeyRow) -> None:
        await self.store.execute(
            "INSERT INTO sec_api_keys (id, name, key_hash, owner_id, roles, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.id, key.name, key.key_hash, key.owner_id, json.dumps(list(key.roles)), key.created_at,
             key.expires_at))

    async def api_key(self, kid: str) -> ApiKeyRow | None:
        r = await self.store.fetchone("SELECT * FROM sec_api_keys WHERE id = ?", (kid,))
        return None if r is None else ApiKeyRow.from_record(r)

    async def api_key_with_owner(self, kid: str) -> KeyWithOwner | None:
        r = await self.store.fetchone(
            "SELECT k.*, u.disabled, u.group_name AS owner_group FROM sec_api_keys k JOIN sec_users u "
            "ON u.id = k.owner_id WHERE k.id = ?", (kid,))
        return None if r is None else KeyWithOwner(ApiKeyRow.from_record(r), bool(r["disabled"]), r["owner_group"])

    async def api_keys(self) -> list[ApiKeyRow]:
        rows = await self.store.fetchall("SELECT * FROM sec_api_keys ORDER BY created_at")
        return [ApiKeyRow.from_record(r) for r in rows]

    async def revoke_api_key(self, kid: str) -> bool:
        """False when there is no such key."""
        return await self.store.execute("UPDATE sec_api_keys SET revoked = 1 WHERE id = ?", (kid,)) > 0

    # -- groups ---------------------------------------------------------------------------------------
    async def groups(self) -> list[dict[str, Any]]:
        """Each group with how many users and API keys are in it."""
        return await self.store.fetchall(
            "SELECT g.name, g.description, g.created_at, "
            "(SELECT COUNT(*) FROM sec_users u WHERE u.group_name = g.name) AS users, "
            "(SELECT COUNT(*) FROM sec_api_keys k WHERE k.group_name = g.name AND k.revoked = 0) AS keys "
            "FROM sec_groups g ORDER BY g.name")

    async def group_exists(self, name: str) -> bool:
        return await self.store.fetchone("SELECT name FROM sec_groups WHERE name = ?", (name,)) is not None

    async def insert_group(self, name: str, description: str, now: float) -> bool:
        """False (nothing written) when the name is taken."""

        def run(tx: Tx) -> bool:
            if tx.fetchone("SELECT name FROM sec_groups WHERE name = ?", (name,)):
                return False
            tx.execute("INSERT INTO sec_groups (name, description, created_at) VALUES (?, ?, ?)",
                       (name, description, now))
            return True

        return await self.store.transaction(run)

    async def delete_group(self, name: str) -> str | None:
        """None when deleted; else why not ('missing', or 'in use': members must leave first)."""

        def run(tx: Tx) -> str | None:
            if not tx.fetchone("SELECT name FROM sec_groups WHERE name = ?", (name,)):
                return "missing"
            if tx.fetchone("SELECT id FROM sec_users WHERE group_name = ? UNION ALL "
                           "SELECT id FROM sec_api_keys WHERE group_name = ? AND revoked = 0", (name, name)):
                return "in use"
            tx.execute("DELETE FROM sec_groups WHERE name = ?", (name,))
            return None

        return await self.store.transaction(run)

    async def set_group(self, table: str, row_id: str, group: str | None) -> bool:
        """Put a user (`sec_users`) or an API key (`sec_api_keys`) in `group` (None: no group); False when
        the row or the group does not exist (checked in the same transaction)."""
        assert table in ("sec_users", "sec_api_keys")

        def run(tx: Tx) -> bool:
            if group is not None and not tx.fetchone("SELECT name FROM sec_groups WHERE name = ?", (group,)):
                return False
            return tx.execute(f"UPDATE {table} SET group_name = ? WHERE id = ?", (group, row_id)) > 0

        return await self.store.transaction(run)

    # -- roles ----------------------------------------------------------------------------------------
    async def custom_roles(self) -> list[Role]:
        rows = await self.store.fetchall("SELECT * FROM sec_roles")
        return [Role(r["name"], _perms(r["allow_perms"]), _perms(r["deny_perms"]), False, r["description"])
                for r in rows]

    async def insert_role(self, role: Role, now: float) -> bool:
        """False (nothing written) when the name is taken."""

        def run(tx: Tx) -> bool:
            if tx.fetchone("SELECT name FROM sec_roles WHERE name = ?", (role.name,)):
                return False
            tx.execute("INSERT INTO sec_roles (name, allow_perms, deny_perms, description, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (role.name, json.dumps([list(p) for p in role.allow]),
                        json.dumps([list(p) for p in role.deny]), role.description, now))
            return True

        return await self.store.transaction(run)

    async def delete_role(self, name: str) -> bool:
        """False when there is no such role."""
        return await self.store.execute("DELETE FROM sec_roles WHERE name = ?", (name,)) > 0


def _insert_user(tx: Tx, u: NewUser, *, with_history: bool) -> None:
    """`with_history`: start the password history with this hash (first-start users begin without one; a
    password change then counts the current hash in)."""
    tx.execute(
        "INSERT INTO sec_users (id, name, kind, roles, pw_hash, pw_changed_at, must_change, created_at, pw_history)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (u.id, u.name, u.kind, json.dumps(list(u.roles)), u.pw_hash, u.created_at, 1 if u.must_change else 0,
         u.created_at, json.dumps([u.pw_hash]) if with_history else None),
    )
