"""The keystore on PostgreSQL (the scale-out state store), in a throwaway database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from xcstack.config import load_settings
from xcstack.crypto.owner import build_service

PG_ADMIN = os.environ.get("XC_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    name = f"xc_crypto_test_{os.getpid()}_{os.urandom(3).hex()}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:  # pragma: no cover - no PostgreSQL on this machine
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


async def test_keystore_on_postgres(pg_url: str, data_dir: Path) -> None:
    settings = load_settings(None, data_dir=data_dir, state={"url": pg_url}, crypto={"access": "direct"})
    svc = await build_service(settings)
    try:
        await svc.create_key("pg-signer", "sm2")
        await svc.create_key("pg-secret", "sm4")
        _, sig = await svc.handle({"op": "sign", "key": "pg-signer"}, memoryview(b"doc"))
        _, ct = await svc.handle({"op": "encrypt", "key": "pg-secret"}, memoryview(b"s3cret"))
        await svc.create_key("pg-signer", "", rotate=True)
        m, _ = await svc.handle({"op": "verify", "key": "pg-signer", "sig": sig}, memoryview(b"doc"))
        assert m["valid"] and m["version"] == 1
        assert (await svc.handle({"op": "decrypt", "key": "pg-secret"}, memoryview(ct)))[1] == b"s3cret"
        keys = {k["name"]: k for k in (await svc.handle({"op": "list_keys"}, memoryview(b"")))[0]["keys"]}
        assert keys["pg-signer"]["versions"] == 2
    finally:
        svc.close()
        await svc.keystore.store.close()
