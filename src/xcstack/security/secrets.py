"""Named secrets at rest (upstream API keys, DB passwords): SM4-GCM sealed in the state store.

Store once, by name, with `xcstack secret set NAME` (read from the terminal without echo, or from
stdin); reference it from config as `secret:NAME` instead of the clear value. Capabilities resolve
references at start::

    store = ctx.get("secrets")                 # SecretStore, provided by the security capability
    api_key = await store.resolve(settings.gateway.upstreams[0].api_key)   # "secret:openai" -> value

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

from xcstack.errors import BadRequest, NotFound
from xcstack.security.secretbox import SecretBox, zero
from xcstack.state.store import StateStore

PREFIX = "secret:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
                             code="invalid_parameter")
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
            raise NotFound(f"no secret named {name!r}", code="secret_not_found")
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
