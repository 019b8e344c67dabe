"""Named secrets at rest (upstream API keys, DB passwords): SM4-GCM sealed in the state store.

Store once, by name, with `xcstack secret set NAME` (read from the terminal without echo, or from
stdin); reference it from config as `secret:NAME` instead of the clear value. Capabilities resolve
references when they start (the security capability, which provides the store, starts first)::

    secrets = ctx.services.secrets             # SecretStore, or None without the security capability
    value = await resolve_setting(secrets, "secret:openai", "gateway.upstreams[0].api_key")
    dsn, used = await resolve_dsn(secrets, "mysql://app:{secret:db-main}@db/app", "db.databases.main.dsn")

Both raise `ConfigError` naming the config key and the reason (no security capability, no such
secret, a value that cannot be opened or used); the config itself keeps the reference. Users:
`gateway.upstreams[].api_key` (gateway/capability.py) and `db.databases.*.dsn|shards` (db/bridge.py).

The value is sealed with the security capability's SecretBox (the keystore's SM4 key through the
crypto client; AAD binds it to its name) and never written in clear to the database, the config,
the logs or the audit log (the audit records only the name). `reveal` returns a bytearray the
caller should `zero()` after use; `resolve` must return a `str` for libraries that need one —
Python cannot wipe those copies (see docs/security.md, "Limits").
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

from xcstack.config import ConfigError
from xcstack.errors import BadRequest, CoreCode, NotFound
from xcstack.security.protocol import SecurityCode
from xcstack.security.secretbox import SecretBox, zero
from xcstack.state.store import StateStore

PREFIX = "secret:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PLACEHOLDER_RE = re.compile(r"\{secret:([^{}]*)\}")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KV_UNSAFE = re.compile(r"[\s'\"\\;]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KV_PASSWORD = re.compile(r"(?i)(?:^|[\s;])(?:password|pwd)\s*=\s*('(?:\\.|[^'\\])*'|[^\s;]*)")


def _aad(name: str) -> bytes:
    return b"secret:" + name.encode()


class SecretStore:
    def __init__(self, store: StateStore, box: SecretBox, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.box = box
        self.clock = clock

    @staticmethod
    def check_name(name: str) -> str:
        if not NAME_RE.match(name):
            raise BadRequest("secret names are 1-128 of A-Z a-z 0-9 . _ - (starting alphanumeric)",
                             code=CoreCode.INVALID_PARAMETER)
        return name

    async def set(self, name: str, value: bytes | bytearray) -> None:
        self.check_name(name)
        sealed = base64.b64encode(await self.box.seal(value, _aad(name))).decode()
        now = self.clock()
        await self.store.execute("DELETE FROM sec_secrets WHERE name = ?", (name,))
        await self.store.execute("INSERT INTO sec_secrets (name, sealed, updated_at) VALUES (?, ?, ?)",
                                 (name, sealed, now))

    async def reveal(self, name: str) -> bytearray:
        row = await self.store.fetchone("SELECT sealed FROM sec_secrets WHERE name = ?", (self.check_name(name),))
        if row is None:
            raise NotFound(f"no secret named {name!r}", code=SecurityCode.SECRET_NOT_FOUND)
        return await self.box.open(base64.b64decode(row["sealed"]), _aad(name))

    async def resolve(self, value: str | None) -> str | None:
        """`secret:NAME` -> the stored value; anything else is returned unchanged."""
        if value is None or not value.startswith(PREFIX):
            return value
        buf = await self.reveal(value[len(PREFIX):])
        try:
            return buf.decode()
        finally:
            zero(buf)

    async def names(self) -> list[dict[str, object]]:
        rows = await self.store.fetchall("SELECT name, updated_at FROM sec_secrets ORDER BY name")
        return [{"name": r["name"], "updated_at": r["updated_at"]} for r in rows]

    async def delete(self, name: str) -> bool:
        return await self.store.execute("DELETE FROM sec_secrets WHERE name = ?", (self.check_name(name),)) > 0


# --- references from config ------------------------------------------------------------------------
def is_ref(value: str | None) -> bool:
    """True for a whole-field `secret:NAME` reference."""
    return value is not None and value.startswith(PREFIX)


def has_refs(value: str | None) -> bool:
    """True for `secret:NAME` or a DSN holding `{secret:NAME}` placeholders."""
    return value is not None and (value.startswith(PREFIX) or PLACEHOLDER_RE.search(value) is not None)


async def _reveal_text(secrets: SecretStore | None, name: str, key: str) -> str:
    """The secret `name` as text, or ConfigError naming `key`. Messages never carry the value."""
    if secrets is None:
        raise ConfigError(f"{key}: refers to secret {name!r}, but the security capability (which holds the "
                          "secret store) is not enabled ([security] enabled = false)")
    if not NAME_RE.match(name):
        raise ConfigError(f"{key}: {name!r} is not a valid secret name (1-128 of A-Z a-z 0-9 . _ -, "
                          "starting alphanumeric)")
    try:
        buf = await secrets.reveal(name)
    except NotFound:
        raise ConfigError(f"{key}: secret {name!r} not found (xcstack secret set {name})") from None
    except Exception as exc:
        from xcstack.crypto.errors import DecryptionFailed

        if isinstance(exc, DecryptionFailed):
            raise ConfigError(f"{key}: secret {name!r} cannot be opened with this node's key (stored with "
                              "another keystore or [crypto] setting? set it again: xcstack secret set "
                              f"{name})") from None
        reason = getattr(exc, "message", None) or type(exc).__name__
        raise ConfigError(f"{key}: secret {name!r} could not be read: {reason}") from None
    try:
        return buf.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: secret {name!r} is not UTF-8 text") from None
    finally:
        zero(buf)


async def resolve_setting(secrets: SecretStore | None, value: str, key: str) -> str:
    """A whole-field `secret:NAME` -> the stored value; anything else unchanged. The value must be
    one line (no control characters): it goes into headers and connection strings."""
    if not is_ref(value):
        return value
    name = value[len(PREFIX):]
    text = await _reveal_text(secrets, name, key)
    if _CONTROL.search(text):
        raise ConfigError(f"{key}: secret {name!r} contains control characters (a line break?); "
                          f"store it again without them (xcstack secret set {name})")
    return text


async def resolve_dsn(secrets: SecretStore | None, dsn: str, key: str) -> tuple[str, list[str]]:
    """A DSN with its secret references resolved, and the strings to redact from messages about it.

    - `secret:NAME` or `{secret:NAME}` as the whole field: the secret holds the whole DSN;
    - `{secret:NAME}` inside a URL DSN (`scheme://user:{secret:NAME}@host/db`): the value is
      percent-encoded (the drivers decode it);
    - `{secret:NAME}` inside a key=value DSN (`password={secret:NAME}`, `PWD={secret:NAME};`): the
      value goes in as is, so it may not hold spaces, quotes, backslashes or `;` (use the URL form or
      a whole-DSN secret for those).

    The redaction list holds the values used and the password found in the resulting DSN (which also
    covers plain DSNs), so connection errors can be logged without them.
    """
    whole = PLACEHOLDER_RE.fullmatch(dsn)
    if is_ref(dsn) or whole is not None:
        name = whole.group(1) if whole is not None else dsn[len(PREFIX):]
        out = await resolve_setting(secrets, PREFIX + name, key)
        used = [out]
    else:
        url = _URL_RE.match(dsn) is not None
        parts: list[str] = []
        used = []
        pos = 0
        for m in PLACEHOLDER_RE.finditer(dsn):
            name = m.group(1)
            value = await resolve_setting(secrets, PREFIX + name, key)
            used.append(value)
            if url:
                value = quote(value, safe="")
            elif _KV_UNSAFE.search(value):
                raise ConfigError(f"{key}: secret {name!r} holds spaces, quotes, backslashes or ';', which a "
                                  "key=value DSN cannot take unquoted; use the URL form of the DSN (the value is "
                                  "percent-encoded there) or store the whole DSN as the secret")
            parts += [dsn[pos:m.start()], value]
            pos = m.end()
        out = "".join(parts) + dsn[pos:]
    return out, dsn_redactions(out, used)


def dsn_redactions(dsn: str, values: list[str] | None = None) -> list[str]:
    """What to hide from messages about `dsn`: the given values (also percent-encoded) and the
    password written in it (URL `user:password@`, `password=` / `PWD=`), longest first."""
    found = [v for v in values or [] if v]
    found += [quote(v, safe="") for v in found]
    if _URL_RE.match(dsn):
        try:
            pw = urlsplit(dsn).password
        except ValueError:
            pw = None
        if pw:
            found += [pw, unquote(pw)]
    else:
        for m in _KV_PASSWORD.finditer(dsn):
            v = m.group(1)
            if v:
                found += [v, v.strip("'")]
    return sorted({v for v in found if v}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for v in secrets:
        text = text.replace(v, "***")
    return text
