"""Named, versioned keys.

A key is a name (`audit-signing`) with versions 1..n; the newest active version signs and encrypts,
older versions stay for verify/decrypt until they are destroyed. The keystore keeps the metadata
in xcstack's state store (SQLite or PostgreSQL, table `crypto_keys`) together with what the backend
needs to use the key again:

- soft backend: the private/secret key sealed with SM4-GCM under the master key (AAD binds name,
  version and kind, so a sealed blob cannot be swapped between keys);
- pkcs11: the object label on the token (the key never leaves it);
- sdf: the device key index (SM2) or the SM4 key wrapped by the device KEK.

The master key (16 bytes) comes from `XC_CRYPTO__MASTER_KEY` / `[crypto] master_key`, or from a file
that must be owned by the current user and not readable by group/others (0600; checked on every
load). It is never logged; a check value in `crypto_meta` catches a wrong master key up front.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xcstack.crypto.errors import BackendError, CryptoError, InvalidCryptoInput, KeyExists, KeyNotFound
from xcstack.crypto.protocol import CryptoCode
from xcstack.crypto.recipes import hmac_sm3
from xcstack.crypto.settings import CryptoSettings, parse_master_key
from xcstack.state.store import StateStore, Tx

KeyKind = Literal["sm2", "sm4", "hmac-sm3"]
KINDS: tuple[str, ...] = ("sm2", "sm4", "hmac-sm3")
# what each kind may do
KIND_OPS: dict[str, frozenset[str]] = {
    "sm2": frozenset({"sign", "verify", "encrypt", "decrypt"}),
    "sm4": frozenset({"encrypt", "decrypt"}),
    "hmac-sm3": frozenset({"hmac"}),
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MIGRATIONS: list[Any] = [
    {
        "sqlite": """
        CREATE TABLE IF NOT EXISTS crypto_keys (
            name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, backend TEXT NOT NULL,
            algorithm TEXT NOT NULL, public_key BLOB, sealed BLOB, handle TEXT,
            state TEXT NOT NULL DEFAULT 'active', created_at REAL NOT NULL,
            PRIMARY KEY (name, version));
        CREATE TABLE IF NOT EXISTS crypto_meta (k TEXT PRIMARY KEY, v BLOB NOT NULL)
        """,
        "postgres": """
        CREATE TABLE IF NOT EXISTS crypto_keys (
            name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, backend TEXT NOT NULL,
            algorithm TEXT NOT NULL, public_key BYTEA, sealed BYTEA, handle TEXT,
            state TEXT NOT NULL DEFAULT 'active', created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (name, version));
        CREATE TABLE IF NOT EXISTS crypto_meta (k TEXT PRIMARY KEY, v BYTEA NOT NULL)
        """,
    }
]


@dataclass(frozen=True)
class KeyRecord:
    name: str
    version: int
    kind: str
    backend: str
    algorithm: str
    public_key: bytes | None
    sealed: bytes | None
    handle: str | None
    state: str
    created_at: float

    def public_info(self) -> dict[str, Any]:
        """What may be shown to anyone (no sealed material)."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "backend": self.backend,
            "algorithm": self.algorithm,
            "state": self.state,
            "created_at": self.created_at,
            "public_key": self.public_key.hex() if self.public_key else None,
        }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidCryptoInput(
            "key name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _row(r: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        name=r["name"],
        version=int(r["version"]),
        kind=r["kind"],
        backend=r["backend"],
        algorithm=r["algorithm"],
        public_key=bytes(r["public_key"]) if r["public_key"] is not None else None,
        sealed=bytes(r["sealed"]) if r["sealed"] is not None else None,
        handle=r["handle"],
        state=r["state"],
        created_at=float(r["created_at"]),
    )


# ---------------------------------------------------------------------------------------------
# master key
# ---------------------------------------------------------------------------------------------
class MasterKeyError(CryptoError):
    code = CryptoCode.MASTER_KEY_ERROR


def master_key_path(settings: CryptoSettings, data_dir: Path) -> Path:
    return settings.master_key_file or (data_dir / "crypto" / "master.key")


def load_master_key(settings: CryptoSettings, data_dir: Path) -> bytes:
    """The 16-byte master key: env/config value first, else the key file (created 0600 if allowed)."""
    if settings.master_key is not None:
        return parse_master_key(settings.master_key.get_secret_value())
    path = master_key_path(settings, data_dir)
    if not path.exists():
        if not settings.create_master_key:
            raise MasterKeyError(f"master key file {path} does not exist (and create_master_key = false)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(16).hex() + "\n")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise MasterKeyError(f"master key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise MasterKeyError(
            f"master key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable by "
            f"group or others (chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        raise MasterKeyError(f"master key file {path} is owned by uid {st.st_uid}, not by this user")
    raw = path.read_bytes()
    if len(raw) == 16:
        return raw
    try:
        return parse_master_key(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MasterKeyError(f"master key file {path}: want 16 raw bytes, 32 hex characters or base64") from None


def seal_aad(name: str, version: int, kind: str) -> bytes:
    return f"xcstack-key\x00{name}\x00{version}\x00{kind}".encode()


# ---------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------
class Keystore:
    """Async access to key records (metadata + sealed material) in the state store."""

    def __init__(self, store: StateStore, settings: CryptoSettings) -> None:
        self.store = store
        self.settings = settings
        self._cache: dict[str, tuple[float, list[KeyRecord]]] = {}

    async def init(self) -> None:
        await self.store.migrate("crypto", MIGRATIONS)

    async def check_master_key(self, master_key: bytes) -> None:
        """Bind the keystore to its master key: the first start stores a check value; later starts
        with another master key fail here instead of on the first decrypt."""
        kcv = hmac_sm3(master_key, b"xcstack master key check value")[:8]

        def run(tx: Tx) -> bytes | None:
            row = tx.fetchone("SELECT v FROM crypto_meta WHERE k = 'master_kcv'")
            if row is None:
                tx.execute("INSERT INTO crypto_meta (k, v) VALUES ('master_kcv', ?)", (kcv,))
                return None
            return bytes(row["v"])

        stored = await self.store.transaction(run)
        if stored is not None and stored != kcv:
            raise MasterKeyError("the master key does not match the one this keystore was created with")

    async def versions(self, name: str, *, fresh: bool = False) -> list[KeyRecord]:
        """All versions of `name`, newest first; KeyNotFound when there is none.
        Cached for `key_cache_ttl_s` so hot paths do not hit the database."""
        check_name(name)
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and not fresh and now - hit[0] < self.settings.key_cache_ttl_s:
            return hit[1]
        rows = await self.store.fetchall(
            "SELECT * FROM crypto_keys WHERE name = ? AND state = 'active' ORDER BY version DESC", (name,)
        )
        recs = [_row(r) for r in rows]
        if not recs:
            self._cache.pop(name, None)
            raise KeyNotFound(f"no key named {name!r}")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (now, recs)
        return recs

    async def get(self, name: str, version: int | None = None) -> KeyRecord:
        recs = await self.versions(name)
        if version is None:
            return recs[0]
        for r in recs:
            if r.version == version:
                return r
        recs = await self.versions(name, fresh=True)  # maybe rotated by another process just now
        for r in recs:
            if r.version == version:
                return r
        raise KeyNotFound(f"key {name!r} has no version {version}")

    async def next_version(self, name: str) -> int:
        row = await self.store.fetchone("SELECT MAX(version) AS v FROM crypto_keys WHERE name = ?", (name,))
        return int(row["v"]) + 1 if row and row["v"] is not None else 1

    async def insert(self, rec: KeyRecord, *, must_be_new: bool) -> None:
        def run(tx: Tx) -> None:
            row = tx.fetchone("SELECT MAX(version) AS v FROM crypto_keys WHERE name = ?", (rec.name,))
            current = int(row["v"]) if row and row["v"] is not None else 0
            if must_be_new and current:
                raise KeyExists(f"key {rec.name!r} already exists (use rotate for a new version)")
            if not must_be_new and not current:
                raise KeyNotFound(f"no key named {rec.name!r}")
            if rec.version != current + 1:
                raise KeyExists(f"key {rec.name!r} was changed concurrently; retry")
            tx.execute(
                "INSERT INTO crypto_keys (name, version, kind, backend, algorithm, public_key, sealed, handle,"
                " state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.name,
                    rec.version,
                    rec.kind,
                    rec.backend,
                    rec.algorithm,
                    rec.public_key,
                    rec.sealed,
                    rec.handle,
                    rec.state,
                    rec.created_at,
                ),
            )
            # keep at most max_versions active versions
            tx.execute(
                "UPDATE crypto_keys SET state = 'retired' WHERE name = ? AND state = 'active' AND version <= ?",
                (rec.name, rec.version - self.settings.max_versions),
            )

        await self.store.transaction(run)
        self._cache.pop(rec.name, None)

    async def store_public_key(self, rec: KeyRecord, public_key: bytes) -> KeyRecord:
        """Keep the public half of a key stored without it (a keystore written by an older xcstack): the
        caller derives it once through the SM2 backend; from then on every load finds it here."""

        def run(tx: Tx) -> None:
            tx.execute(
                "UPDATE crypto_keys SET public_key = ? WHERE name = ? AND version = ? AND public_key IS NULL",
                (public_key, rec.name, rec.version),
            )

        await self.store.transaction(run)
        self._cache.pop(rec.name, None)
        return dataclasses.replace(rec, public_key=public_key)

    async def handles(self, backend: str) -> frozenset[str]:
        """Device handles used by any key version of `backend` (active or retired)."""
        rows = await self.store.fetchall(
            "SELECT DISTINCT handle FROM crypto_keys WHERE backend = ? AND handle IS NOT NULL", (backend,)
        )
        return frozenset(str(r["handle"]) for r in rows)

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT name, kind, backend, algorithm, MAX(version) AS version, COUNT(*) AS versions, "
            "MIN(created_at) AS created_at FROM crypto_keys WHERE state = 'active' "
            "GROUP BY name, kind, backend, algorithm ORDER BY name"
        )
        return [dict(r) for r in rows]


def new_record(
    name: str, version: int, kind: str, backend: str, algorithm: str,
    public_key: bytes | None, sealed: bytes | None, handle: str | None,
) -> KeyRecord:
    if kind not in KINDS:
        raise InvalidCryptoInput(f"key kind must be one of {', '.join(KINDS)}")
    if sealed is None and handle is None:
        raise BackendError("a key needs sealed material or a device handle")
    return KeyRecord(name, version, kind, backend, algorithm, public_key, sealed, handle, "active", time.time())
