"""Wire schemas of the security endpoints.

JSON bodies are validated strictly: a boolean is not a number (`{"days": true}` is not one day), a
number is not a string, a string is not a number or a boolean. The query-string model (`AuditQuery`)
stays lax, since every query value arrives as text; its patterns accept ASCII digits only."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import Strict as StrictMode

NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
# JSON has no tuples: a (resource, action) pair arrives as a two-item list; its items stay strict strings
Perm = Annotated[tuple[str, str], StrictMode(False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(Strict):
    username: str = Field(min_length=1, max_length=64)
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
    description: str = Field(default="", max_length=256)


class ApiKeyCreate(Strict):
    name: str = Field(pattern=NAME)
    roles: list[str] = Field(min_length=1, max_length=16)
    days: int | None = Field(default=None, ge=1, le=3650)


class AuditQuery(Query):
    """One chain from `after_seq` on (`chain=`), or every chain merged by time (no `chain`): then
    `since`/`until` bound the UTC timestamps and `after` (the previous page's `next`) continues."""

    chain: str | None = Field(default=None, max_length=128)
    after_seq: int = Field(default=0, ge=0)
    since: str | None = Field(default=None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+Z?)?$")
    until: str | None = Field(default=None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+Z?)?$")
    after: str | None = Field(default=None, max_length=256)
    limit: int = Field(default=100, ge=1, le=1000)
    action: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=128)
    outcome: str | None = Field(default=None, max_length=16)
