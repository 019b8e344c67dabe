"""Config validation, and Milvus Lite as a supervised side process shared by http workers."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.vector.conftest import structured
from xcstack.config import ConfigError, load_settings
from xcstack.vector.capability import side_processes


@pytest.mark.parametrize(
    ("vector", "key", "reason"),
    [
        ({"backend": "pgvector"}, "vector", "needs vector.pgvector.url"),
        ({"max_top_k": 0}, "vector.max_top_k", "greater than or equal to 1"),
        ({"acquire_timeout_s": 0}, "vector.acquire_timeout_s", "greater than 0"),
        ({"milvus": {"uri": "ftp://x"}}, "vector.milvus.uri", "http(s)://host:port"),
        ({"pgvector": {"url": "mysql://x"}}, "vector.pgvector.url", "postgresql://"),
        ({"pgvector": {"db_schema": "a;drop"}}, "vector.pgvector.db_schema", "SQL identifier"),
        ({"pgvector": {"pool_min": 9, "pool_max": 2}}, "vector.pgvector", "pool_min must be <= pool_max"),
        ({"milvus": {"nope": 1}}, "vector.milvus.nope", "unknown key"),
    ],
)
def test_bad_config_names_key_and_reason(vector: dict[str, Any], key: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data_dir=tmp_path, vector=vector)
    text = str(info.value)
    assert f"  {key}:" in text and reason in text, text


def test_side_process_spec_only_for_lite_side_process(tmp_path: Path) -> None:
    assert side_processes(load_settings(data_dir=tmp_path, vector={"milvus": {"lite_mode": "in_process"}}), None) == []
    for mode in ("auto", "side_process"):
        s = load_settings(data_dir=tmp_path, vector={"milvus": {"lite_mode": mode}})
        [spec] = side_processes(s, None)
        assert spec.target == "xcstack.vector.lite_server:run" and spec.instances == 1
        assert spec.ready_check is not None
    s = load_settings(data_dir=tmp_path, vector={"backend": "pgvector", "pgvector": {"url": "postgresql://x/y"}})
    assert side_processes(s, None) == []
    s = load_settings(data_dir=tmp_path, vector={"milvus": {"lite_mode": "side_process", "uri": "http://m:19530"}})
    assert side_processes(s, None) == []


def _run_lite(settings: Any) -> None:
    from xcstack.vector.lite_server import run

    run(settings, 0)


async def test_two_workers_share_a_lite_side_process(data_dir: Path, open_app: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings(
        data_dir=data_dir,
        vector={
            "acquire_timeout_s": 1.0,
            "health_interval_s": 0.2,
            "milvus": {"lite_mode": "side_process", "lite_port": port},
        },
    )
    proc = multiprocessing.get_context("spawn").Process(target=_run_lite, args=(settings,), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.2)
        x = structured(10, 8)
        async for a in open_app(settings):
            async for b in open_app(settings):  # a second "worker" on the same database
                for _ in range(50):  # the health loop connects within a few ticks
                    if (await a.client.get("/readyz")).status_code == 200 and (
                        await b.client.get("/readyz")
                    ).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                r = await a.client.post("/v1/vectors/collections", json={"name": "shared", "dimension": 8})
                assert r.status_code == 201, r.text
                r = await a.client.post("/v1/vectors/shared/upsert", json={"vectors": x.tolist()})
                assert r.status_code == 200, r.text
                r = await b.client.post("/v1/vectors/shared/search", json={"vector": x[3].tolist(), "top_k": 1})
                assert r.status_code == 200, r.text
                assert r.json()["data"][0]["score"] > 0.999
                assert (await b.client.get("/v1/vectors/collections/shared")).json()["count"] == 10
        assert (data_dir / "vectors" / "milvus.db").exists()
    finally:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(15)
        assert proc.exitcode == 0


def test_auto_mode_uses_the_side_process_when_it_listens(tmp_path: Path) -> None:
    from xcstack.vector.milvus import resolve_uri

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        s = load_settings(data_dir=tmp_path, vector={"milvus": {"lite_port": port}})
        assert resolve_uri(s.vector, tmp_path) == str(tmp_path / "vectors" / "milvus.db")  # nothing listens
        sock.listen(1)
        assert resolve_uri(s.vector, tmp_path) == f"http://127.0.0.1:{port}"
        [spec] = side_processes(s, None)
        assert spec.ready_check is not None and spec.ready_check(0) is True
