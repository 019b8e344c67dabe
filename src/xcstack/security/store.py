"""State-store schema of the security capability (namespace "security")."""

from __future__ import annotations

from typing import Any

_COMMON = """
CREATE TABLE IF NOT EXISTS sec_users (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, roles TEXT NOT NULL,
    pw_hash TEXT, pw_changed_at {real} NOT NULL, must_change INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0, totp_secret TEXT, totp_enabled INTEGER NOT NULL DEFAULT 0,
    totp_last_step BIGINT NOT NULL DEFAULT 0, recovery TEXT, created_at {real} NOT NULL);
CREATE TABLE IF NOT EXISTS sec_pw_history (
    user_id TEXT NOT NULL, pw_hash TEXT NOT NULL, created_at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS sec_pw_history_user ON sec_pw_history (user_id, created_at);
CREATE TABLE IF NOT EXISTS sec_sessions (
    token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, created_at {real} NOT NULL,
    last_seen {real} NOT NULL, restricted TEXT);
CREATE INDEX IF NOT EXISTS sec_sessions_user ON sec_sessions (user_id);
CREATE TABLE IF NOT EXISTS sec_api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, owner_id TEXT NOT NULL,
    roles TEXT NOT NULL, created_at {real} NOT NULL, expires_at {real} NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sec_roles (
    name TEXT PRIMARY KEY, allow_perms TEXT NOT NULL, deny_perms TEXT NOT NULL, description TEXT NOT NULL,
    created_at {real} NOT NULL);
CREATE TABLE IF NOT EXISTS sec_lockout (
    k TEXT PRIMARY KEY, failures INTEGER NOT NULL, locked_until {real} NOT NULL, updated_at {real} NOT NULL);
CREATE TABLE IF NOT EXISTS sec_secrets (
    name TEXT PRIMARY KEY, sealed TEXT NOT NULL, updated_at {real} NOT NULL)
"""

MIGRATIONS: list[Any] = [
    {"sqlite": _COMMON.format(real="REAL"), "postgres": _COMMON.format(real="DOUBLE PRECISION")},
    # v2: password history as an ordered list in the user row (timestamps can tie)
    "ALTER TABLE sec_users ADD COLUMN pw_history TEXT; DROP TABLE IF EXISTS sec_pw_history",
    # v3: groups (部门/租户) of users and API keys, for usage quotas and reports (docs/usage.md)
    {dialect: "CREATE TABLE IF NOT EXISTS sec_groups (name TEXT PRIMARY KEY, description TEXT NOT NULL, "
              f"created_at {real} NOT NULL); ALTER TABLE sec_users ADD COLUMN group_name TEXT; "
              "ALTER TABLE sec_api_keys ADD COLUMN group_name TEXT"
     for dialect, real in (("sqlite", "REAL"), ("postgres", "DOUBLE PRECISION"))},
    # v4: the client address a session signed in from (the secadmin's list of sessions)
    "ALTER TABLE sec_sessions ADD COLUMN ip TEXT",
]
