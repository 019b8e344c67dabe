"""The worker core behind a real IPC server: embed/infer ops, a cancelled caller's rows never run,
unknown models and full queues map to stable codes."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xcstack.inference.core import WorkerCore
from xcstack.inference.repository import ModelRepository
from xcstack.inference.settings import InferenceSettings
from xcstack.ipc.channel import IPCClient, IPCRemoteError, IPCServer

MODEL = "all-minilm-l6-v2"


@pytest.fixture
async def core_server(model_repo: Path, tmp_path: Path) -> Any:
    settings = InferenceSettings.model_validate({"batching": {"max_queue": 4, "max_wait_ms": 0}})
    core = WorkerCore(ModelRepository(model_repo).scan(), settings, only=[MODEL])
    core.load()
    core.start()
    server = IPCServer(tmp_path / "w.sock", core.handle)
    await server.start()
    client = IPCClient(tmp_path / "w.sock")
    yield core, client
    await client.close()
    await server.close()
    await core.close()


async def test_embed_and_infer_ops(core_server: Any) -> None:
    from xcstack.inference.tensors import pack, unpack

    _core, client = core_server
    meta, payload = await client.call("embed", {"model": MODEL, "texts": ["a b c", "你好"], "timeout": 5})
    arr = np.frombuffer(payload, "<f4").reshape(meta["shape"])
    assert arr.shape == (2, 384) and meta["tokens"] > 4
    p = pack({"input_ids": np.array([[101, 2000, 102]]), "attention_mask": np.ones((1, 3), np.int64)})
    meta, payload = await client.call("infer", {"model": MODEL, "tensors": p.descriptors, "timeout": 5}, p.payload())
    assert unpack(meta["tensors"], payload)["embeddings"].shape == (1, 384)
    with pytest.raises(IPCRemoteError) as info:
        await client.call("embed", {"model": "nope", "texts": ["x"]})
    assert info.value.code == "model_not_found"


async def test_cancelled_caller_rows_never_run_and_full_queue_is_fast(core_server: Any) -> None:
    core, client = core_server
    batcher = core.models[MODEL].batcher
    gate = threading.Event()
    seen: list[list[Any]] = []
    real_run = batcher._run

    def gated(batch: list[Any]) -> Any:
        gate.wait(5)
        seen.append([it.data for it in batch])
        return real_run(batch)

    batcher._run = gated
    batcher.inline_tokens = 0  # the gate holds a run open: it must be in the executor, not on the loop
    first = asyncio.create_task(client.call("embed", {"model": MODEL, "texts": ["first"], "timeout": 5}))
    await asyncio.sleep(0.1)  # "first" is running (held at the gate)
    doomed = asyncio.create_task(client.call("embed", {"model": MODEL, "texts": ["doomed one", "doomed two"]}))
    await asyncio.sleep(0.1)
    assert batcher.queued_rows == 2
    # the queue holds 4 rows: 3 more do not fit -> queue_full at once, retriable
    with pytest.raises(IPCRemoteError) as info:
        await client.call("embed", {"model": MODEL, "texts": ["x", "y", "z"]})
    assert info.value.code == "queue_full" and info.value.retriable
    doomed.cancel()  # the client goes away: CANCEL frame -> its rows leave the queue
    await asyncio.sleep(0.1)
    assert batcher.queued_rows == 0
    gate.set()
    await first
    doomed_ids = {tuple(s) for s in core.models[MODEL].model.tokenize(["doomed one", "doomed two"])}
    assert all(tuple(d) not in doomed_ids for batch in seen for d in batch)


async def test_drain_refuses_new_work_and_finishes_queued(core_server: Any) -> None:
    core, client = core_server
    batcher = core.models[MODEL].batcher
    gate = threading.Event()
    real_run = batcher._run

    def gated(batch: list[Any]) -> Any:
        gate.wait(5)
        return real_run(batch)

    batcher._run = gated
    batcher.inline_tokens = 0  # the gate holds a run open: it must be in the executor, not on the loop
    queued = [asyncio.create_task(client.call("embed", {"model": MODEL, "texts": [f"q{i}"], "timeout": 5}))
              for i in range(2)]
    for _ in range(500):  # wait until a batch is really running (held by the gate): a loaded machine is slow
        if batcher.busy:
            break
        await asyncio.sleep(0.01)
    assert batcher.busy
    drain = asyncio.create_task(core.drain(5))
    await asyncio.sleep(0.05)
    with pytest.raises(IPCRemoteError) as info:
        await client.call("embed", {"model": MODEL, "texts": ["late"]})
    assert info.value.code == "worker_stopping" and info.value.retriable
    assert not drain.done()
    gate.set()
    assert await drain is True
    for t in queued:
        meta, _ = await t
        assert meta["shape"] == [1, 384]
