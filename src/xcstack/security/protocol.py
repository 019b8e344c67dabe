"""Wire schemas of the security endpoints.

JSON bodies are validated strictly: a boolean is not a number (`{"days": true}` is not one day), a
number is not a string, a string is not a number or a boolean. The query-string model (`AuditQuery`)
stays lax, since every query value arrives as text; its patterns accept ASCII digits only."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic import Strict as StrictMode


class SecurityCode(StrEnum):
    """Stable error codes of the security capability (docs/security.md, Errors)."""

    INVALID_CREDENTIALS = "invalid_credentials"
    ACCOUNT_LOCKED = "account_locked"
    AUTH_OVERLOADED = "auth_overloaded"
    TOTP_REQUIRED = "totp_required"
    INVALID_TOTP = "invalid_totp"
    TOTP_ENROLLED = "totp_enrolled"
    TOTP_NOT_PENDING = "totp_not_pending"
    PASSWORD_CHANGE_REQUIRED = "password_change_required"  # a session restricted to a password change
    TOTP_ENROLLMENT_REQUIRED = "totp_enrollment_required"  # a session restricted to TOTP enrolment
    PASSWORD_POLICY = "password_policy"
    USER_EXISTS = "user_exists"
    USER_NOT_FOUND = "user_not_found"
    ROLE_EXISTS = "role_exists"
    ROLE_NOT_FOUND = "role_not_found"
    BUILTIN_ROLE = "builtin_role"
    UNKNOWN_ROLE = "unknown_role"
    SEPARATION_OF_DUTIES = "separation_of_duties"
    APIKEY_NOT_FOUND = "apikey_not_found"
    SECRET_NOT_FOUND = "secret_not_found"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    GROUP_EXISTS = "group_exists"
    GROUP_NOT_FOUND = "group_not_found"
    GROUP_IN_USE = "group_in_use"


NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
# text the service looks up or stores as is: PostgreSQL refuses a NUL character in text (500), and
# no stored name holds one
NO_NUL = r"^[^\x00]*$"
# JSON has no tuples: a (resource, action) pair arrives as a two-item list; its items stay strict strings
PermPart = Annotated[str, Field(min_length=1, max_length=256)]  # empty ones are refused anyway (rbac.py)
Perm = Annotated[tuple[PermPart, PermPart], StrictMode(False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(Strict):
    username: str = Field(min_length=1, max_length=64, pattern=NO_NUL)
    password: str = Field(min_length=1, max_length=1024)
    totp: str | None = Field(default=None, max_length=16)
    recovery_code: str | None = Field(default=None, max_length=64)


class PasswordChange(Strict):
    old_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class TotpConfirm(Strict):
    code: str = Field(min_length=6, max_length=16)


class UserCreate(Strict):
    name: str = Field(pattern=NAME)
    roles: list[str] = Field(default_factory=list, max_length=16)
    kind: Literal["human", "service"] = "human"
    password: str | None = Field(default=None, max_length=1024)


class RolesSet(Strict):
    roles: list[str] = Field(max_length=16)


class RoleCreate(Strict):
    name: str = Field(pattern=NAME)
    allow: list[Perm] = Field(min_length=1, max_length=256)
    deny: list[Perm] = Field(default_factory=list, max_length=256)
    description: str = Field(default="", max_length=256, pattern=NO_NUL)


class ApiKeyCreate(Strict):
    name: str = Field(pattern=NAME)
    roles: list[str] = Field(min_length=1, max_length=16)
    days: int | None = Field(default=None, ge=1, le=3650)


class AuditQuery(Query):
    """One chain from `after_seq` on (`chain=`), or every chain merged by time (no `chain`): then
    `since`/`until` bound the UTC timestamps and `after` (the previous page's `next`) continues."""

    chain: str | None = Field(default=None, max_length=128)
    after_seq: int = Field(default=0, ge=0, le=2**63 - 1)  # echoed as `next_after_seq`: must stay a JSON int64
    since: str | None = Field(default=None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+Z?)?$")
    until: str | None = Field(default=None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+Z?)?$")
    after: str | None = Field(default=None, max_length=256)
    limit: int = Field(default=100, ge=1, le=1000)
    action: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=128)
    outcome: str | None = Field(default=None, max_length=16)


# -- responses ------------------------------------------------------------------------------------------
# Documentation of what the endpoints answer (they return dicts built by the service): the OpenAPI
# contract is generated from these, and tests/contract checks real answers against them. Timestamps
# are UNIX seconds (floats); no `extra="forbid"`, so a field added later does not break old clients.
Restriction = Literal["password_change", "totp_enrollment"]


class SecurityOk(BaseModel):
    """`{"ok": true}`: the change is done and audited."""

    ok: Literal[True]


class LoginResult(BaseModel):
    token: str = Field(description="the session token: send it as `Authorization: Bearer <token>`")
    token_type: Literal["bearer"]
    idle_timeout_s: float = Field(description="the session ends after this long without a request")
    expires_at: float = Field(description="UNIX time the session ends at the latest")
    restricted: Restriction | None = Field(
        description="set: the session may only use /v1/auth/* until the password is changed or TOTP enrolled")
    password_expired: bool


class PrincipalInfo(BaseModel):
    id: str
    name: str
    roles: list[str]
    kind: Literal["user", "api_key"]
    restricted: Restriction | None


class TotpEnrollment(BaseModel):
    secret: str = Field(description="base32 TOTP secret (shown once)")
    otpauth_uri: str
    qr: str = Field(description="the otpauth URI as a QR code drawn with text characters")


class RecoveryCodes(BaseModel):
    recovery_codes: list[str] = Field(description="one-time codes for login without the authenticator (shown once)")


class UserInfo(BaseModel):
    id: str
    name: str
    kind: Literal["human", "service"]
    roles: list[str]
    disabled: bool
    must_change_password: bool
    totp_enabled: bool
    created_at: float
    password_changed_at: float
    group: str | None = None


class UserList(BaseModel):
    users: list[UserInfo]


class UserCreated(BaseModel):
    user: UserInfo
    one_time_password: str | None = Field(default=None, description="only when no password was given (shown once)")


class OneTimePassword(BaseModel):
    one_time_password: str = Field(description="must be changed at the next login (shown once)")


class UserActionResult(RootModel[SecurityOk | OneTimePassword]):
    """`reset-password` answers the one-time password; `disable`, `enable` and `reset-totp` answer ok."""


# a (resource, action) pair as answered; not `tuple[str, str]`, whose `prefixItems` schemathesis
# 4.x rejects in a response schema ("Invalid Schema Object")
PermPair = Annotated[list[str], Field(min_length=2, max_length=2)]


class RoleInfo(BaseModel):
    name: str
    allow: list[PermPair] = Field(description="(resource, action) glob pairs")
    deny: list[PermPair]
    builtin: bool
    description: str


class RoleList(BaseModel):
    roles: list[RoleInfo]


class ApiKeyCreated(BaseModel):
    id: str
    name: str
    roles: list[str]
    expires_at: float
    key: str = Field(description="the API key itself (shown once; only its hash is stored)")


class ApiKeyInfo(BaseModel):
    id: str
    name: str
    roles: list[str]
    owner_id: str
    created_at: float
    expires_at: float
    revoked: bool
    group: str | None = Field(default=None, description="its own group; null: its owner's")


class ApiKeyList(BaseModel):
    keys: list[ApiKeyInfo]


class GroupCreate(Strict):
    name: str = Field(pattern=NAME, description="a department or tenant (部门/租户)")
    description: str = Field(default="", max_length=256)


class GroupInfo(BaseModel):
    name: str
    description: str
    created_at: float
    users: int
    keys: int


class GroupList(BaseModel):
    groups: list[GroupInfo]


class SessionInfo(BaseModel):
    id: str = Field(description="derived from the token's hash (never the token): the id to end it by")
    user: str
    created_at: float
    last_seen: float = Field(description="written at most every 30 s")
    ip: str | None = Field(description="the client address at sign-in (null: not known)")
    restricted: Restriction | None


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class Lockout(BaseModel):
    user: str
    locked_for_s: float = Field(description="seconds until the lockout ends by itself")


class LockoutList(BaseModel):
    locked: list[Lockout]


class SecretName(BaseModel):
    name: str
    updated_at: float = Field(description="when the value was last set")


class SecretNameList(BaseModel):
    secrets: list[SecretName] = Field(description="names and dates only, never a value")


class GroupAssign(Strict):
    group: str | None = Field(max_length=64, pattern=NO_NUL, description="the group; null: none")


class AuditChain(BaseModel):
    chain: str
    segments: list[str] = Field(description="segment file names, oldest first")


class AuditChainList(BaseModel):
    chains: list[AuditChain]


class AuditRecord(BaseModel):
    """One hash-chained record as stored (see security/audit/record.py)."""

    seq: int
    ts: str = Field(description="UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`")
    chain: str
    actor: str
    action: str
    resource: str
    outcome: str = Field(description="success, failure, denied or error")
    ip: str | None = None
    request_id: str | None = None
    client_request_id: str | None = None
    detail: dict[str, Any] | None = None
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    records: list[AuditRecord]
    next_after_seq: int | None = Field(
        default=None, description="with `chain`: pass it as `after_seq` for the next page")
    next: str | None = Field(
        default=None, description="without `chain`: pass it as `after` for the next page; null on the last page")


class AuditProblem(BaseModel):
    chain: str
    seq: int = Field(description="the first bad sequence number")
    segment: str
    line: int = Field(description="1-based line in the segment (0: not in a segment)")
    offset: int
    reason: str
    message: str


class AuditChainReport(BaseModel):
    chain: str
    ok: bool
    records: int
    first_seq: int
    last_seq: int
    last_hash: str
    checkpoints: int
    signed_seq: int
    signatures_checked: bool
    live: bool
    problem: AuditProblem | None
    warnings: list[str]


class AuditVerifyResult(BaseModel):
    ok: bool = Field(description="every chain verified")
    chains: list[AuditChainReport]
