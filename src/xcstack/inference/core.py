"""What a model worker does, free of transport: load + warm its models once, batch and run requests.

`WorkerCore.handle(meta, payload)` is the IPC handler of a model worker process (ops: embed, rerank,
infer, health); the inline backend calls `embed`/`infer` directly in the http worker (tests, tiny setups).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcstack.inference.batcher import Batcher, BatcherError, Item, WorkerCode
from xcstack.inference.repository import ModelConfig, ModelRepository
from xcstack.inference.runtime import LEDGER, ModelLoadError, OrtModel
from xcstack.inference.settings import InferenceSettings
from xcstack.inference.tensors import decode_bytes_tensor, pack, unpack

log = logging.getLogger("xcstack.inference")
TOKENIZE_OFFLOAD_CHARS = 64 * 1024
INLINE_TOKENS = 64  # text batches up to this many tokens (longest x rows) run on the loop thread (batcher.py)


class CoreError(Exception):
    """An error with a stable code that crosses the IPC boundary (`IPCRemoteError(code, message)`)."""

    def __init__(self, code: str, message: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = retriable


@dataclass
class Loaded:
    model: OrtModel
    batcher: Batcher
    config: ModelConfig


def _embed_run(model: OrtModel) -> Any:
    def run(batch: list[Item]) -> list[np.ndarray]:
        out = model.embed_ids([it.data for it in batch])
        return list(out)

    return run


def _tensor_run(model: OrtModel) -> Any:
    def run(batch: list[Item]) -> list[dict[str, np.ndarray]]:
        outputs: list[str] = batch[0].key[1] if batch[0].key else model.output_names  # type: ignore[index]
        if len(batch) == 1:
            feed = batch[0].data
        else:
            names = list(batch[0].data)
            feed = {n: np.concatenate([it.data[n] for it in batch], axis=0) for n in names}
        res = model.run(feed, outputs)
        split: list[dict[str, np.ndarray]] = []
        start = 0
        for it in batch:
            split.append({k: v[start : start + it.rows] for k, v in res.items()})
            start += it.rows
        return split

    return run


def _rerank_run(model: OrtModel) -> Any:
    def run(batch: list[Item]) -> list[float]:
        return [float(x) for x in model.score_pairs([it.data for it in batch])]

    return run


def _run_fn(model: OrtModel) -> Any:
    """Text items (key None) go through the tokenizer path (a rerank model: one (query, document) pair per
    item); tensor items (key = signature) run as given. A batch never mixes the two: items of different keys
    are never grouped."""
    embed = _rerank_run(model) if model.config.kind == "rerank" else _embed_run(model)
    tensor = _tensor_run(model)

    def run(batch: list[Item]) -> list[Any]:
        return embed(batch) if batch[0].key is None else tensor(batch)  # type: ignore[no-any-return]

    return run


class WorkerCore:
    def __init__(
        self,
        repo: ModelRepository,
        settings: InferenceSettings,
        *,
        worker_index: int = 0,
        total_workers: int = 1,
        only: Sequence[str] | None = None,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.worker_index = worker_index
        self.total_workers = total_workers
        self.only = set(only) if only is not None else None
        self.models: dict[str, Loaded] = {}
        self.errors: dict[str, str] = {}
        self._pending: list[tuple[ModelConfig, OrtModel]] = []
        self.draining = False

    def assigned(self) -> list[ModelConfig]:
        out = []
        for cfg in self.repo.models():
            if self.only is not None and cfg.name not in self.only:
                continue
            if self.worker_index in cfg.workers_for(self.total_workers):
                out.append(cfg)
        return out

    def load(self) -> None:
        """Blocking: create and warm the sessions of the models assigned to this worker (once)."""
        for cfg in self.assigned():
            entry = self.repo.get(cfg.name)
            assert entry is not None
            t0 = time.perf_counter()
            try:
                m = OrtModel(entry, device_id=cfg.device_id_for(self.worker_index, self.total_workers))
                m.warm()
            except ModelLoadError as exc:
                self.errors[cfg.name] = str(exc)
                log.error("%s", exc)
                continue
            self._pending.append((cfg, m))
            log.info("worker %d: loaded %s in %.2fs", self.worker_index, cfg.name, time.perf_counter() - t0)

    def start(self) -> None:
        """Start the batchers (needs the running loop)."""
        for cfg, m in self._pending:
            b = Batcher(cfg.name, _run_fn(m), cfg.batching_params(self.settings.batching),
                        inline_tokens=INLINE_TOKENS if m.kind == "cpu" else 0)
            b.start()
            self.models[cfg.name] = Loaded(m, b, cfg)
        self._pending = []

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests (callers get retriable `worker_stopping` and go elsewhere) and wait up to
        `timeout` seconds for queued and running batches to finish. True if everything finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(m.batcher.queued_rows == 0 and not m.batcher.busy for m in self.models.values()):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        for loaded in self.models.values():
            await loaded.batcher.close()
        self.models.clear()

    def _get(self, name: str) -> Loaded:
        if self.draining:
            raise CoreError(WorkerCode.WORKER_STOPPING, f"model worker {self.worker_index} is stopping; retry", True)
        loaded = self.models.get(name)
        if loaded is None:
            if name in self.errors:
                raise CoreError(WorkerCode.MODEL_UNAVAILABLE, f"model {name} failed to load: {self.errors[name]}")
            raise CoreError(WorkerCode.MODEL_NOT_FOUND, f"model {name} is not loaded on worker {self.worker_index}")
        return loaded

    # --- operations ------------------------------------------------------------------------------
    async def embed(self, name: str, texts: Sequence[str], timeout: float) -> tuple[np.ndarray, int]:
        loaded = self._get(name)
        if loaded.model.tokenizer is None or loaded.config.kind == "rerank":
            raise CoreError(WorkerCode.NOT_AN_EMBEDDING_MODEL,
                            f"model {name} is not an embedding model; use /v2/models/{name}/infer"
                            + (" or /v1/rerank" if loaded.config.kind == "rerank" else ""))
        if sum(len(t) for t in texts) > TOKENIZE_OFFLOAD_CHARS:  # big inputs: keep the worker loop responsive
            seqs = await asyncio.to_thread(loaded.model.tokenize, texts)
        else:
            seqs = loaded.model.tokenize(texts)
        tokens = sum(len(s) for s in seqs)
        entries = [(1, len(s), s) for s in seqs]
        job = self._submit(loaded, entries, timeout, None)
        rows = await self._wait(job)
        dims = loaded.config.dimensions or (rows[0].shape[0] if rows else 0)
        out = np.stack(rows) if rows else np.zeros((0, dims), np.float32)
        return out, tokens

    async def rerank(self, name: str, query: str, documents: Sequence[str], timeout: float
                     ) -> tuple[np.ndarray, int]:
        """Relevance scores [n] of `documents` to `query` with a cross-encoder, and the tokens read. Each
        pair is one row of the model's dynamic batch (its length counts against the token budget)."""
        loaded = self._get(name)
        if loaded.config.kind != "rerank":
            raise CoreError(WorkerCode.NOT_A_RERANK_MODEL, f"model {name} is not a rerank model")
        if len(query) + sum(len(d) for d in documents) > TOKENIZE_OFFLOAD_CHARS:
            pairs = await asyncio.to_thread(loaded.model.tokenize_pairs, query, documents)
        else:
            pairs = loaded.model.tokenize_pairs(query, documents)
        tokens = sum(len(p[0]) for p in pairs)
        job = self._submit(loaded, [(1, len(p[0]), p) for p in pairs], timeout, None)
        scores = await self._wait(job)
        return np.asarray(scores, dtype=np.float32), tokens

    async def infer(
        self, name: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, timeout: float
    ) -> dict[str, np.ndarray]:
        loaded = self._get(name)
        cfg = loaded.config
        outs = list(outputs) if outputs else [t.name for t in cfg.outputs]
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        length = int(first.shape[1]) if first.ndim >= 2 else 1
        key = (tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())), outs)
        job = self._submit(loaded, [(rows, length, inputs)], timeout, key)
        result: dict[str, np.ndarray] = (await self._wait(job))[0]
        return result

    def _submit(self, loaded: Loaded, entries: list[tuple[int, int, Any]], timeout: float, key: Any) -> Any:
        try:
            return loaded.batcher.submit(entries, time.monotonic() + timeout, key)
        except BatcherError as exc:
            raise CoreError(exc.code, str(exc), exc.retriable) from None

    async def _wait(self, job: Any) -> Any:
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancel()  # a departed client: its queued rows are removed, never run
            raise
        except BatcherError as exc:
            raise CoreError(exc.code, str(exc), exc.retriable) from None

    def health(self) -> dict[str, Any]:
        import os

        return {
            "worker": self.worker_index,
            "pid": os.getpid(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "models": {
                n: {"queued_rows": m.batcher.queued_rows, "batches": m.batcher.batches_run, "rows": m.batcher.rows_run,
                    "cancelled_rows": m.batcher.rows_cancelled}
                for n, m in self.models.items()
            },
            "errors": self.errors,
            "device_live_bytes": LEDGER.snapshot(),
        }

    # --- IPC handler -----------------------------------------------------------------------------
    async def handle(self, meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
        from xcstack.ipc.channel import IPCRemoteError

        op = meta.get("op")
        try:
            if op == "embed":
                if "texts" in meta:
                    texts = [str(t) for t in meta["texts"]]
                else:
                    elems = decode_bytes_tensor(payload, int(meta["count"]), "texts")
                    texts = [b.decode("utf-8", "replace") for b in elems]
                arr, tokens = await self.embed(str(meta["model"]), texts, float(meta.get("timeout", 30.0)))
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                return {"shape": list(arr.shape), "tokens": tokens}, arr.tobytes()
            if op == "rerank":  # payload: BYTES [1 + n], the query then the documents
                elems = decode_bytes_tensor(payload, int(meta["count"]), "texts")
                texts = [b.decode("utf-8", "replace") for b in elems]
                scores, tokens = await self.rerank(str(meta["model"]), texts[0], texts[1:],
                                                   float(meta.get("timeout", 30.0)))
                return {"count": len(scores), "tokens": tokens}, np.ascontiguousarray(scores, "<f4").tobytes()
            if op == "infer":
                inputs = self._open_inputs(meta, payload)
                timeout = float(meta.get("timeout", 30.0))
                res = await self.infer(str(meta["model"]), inputs, meta.get("outputs"), timeout)
                packed = pack(res)
                return {"tensors": packed.descriptors}, packed.payload()
            if op == "health":
                return self.health(), b""
        except CoreError as exc:
            raise IPCRemoteError(exc.code, exc.message, exc.retriable) from None
        raise IPCRemoteError("bad_op", f"unknown op {op!r}")

    @staticmethod
    def _open_inputs(meta: dict[str, Any], payload: memoryview) -> dict[str, np.ndarray]:
        handle = meta.get("shm")
        if handle is None:
            return unpack(meta["tensors"], payload)
        from xcstack.ipc.shm import open_handle

        # Copy out of the segment now: the sender unlinks it when the call ends, which may be while a
        # cancelled request's batch is still running.
        seg = open_handle(handle)
        try:
            tensors = unpack(meta["tensors"], seg.view)
            out = {k: np.array(v, copy=True) for k, v in tensors.items()}
            del tensors
            return out
        finally:
            try:
                seg.close()
            except BufferError:  # a view survived an exception path; the mapping goes with the process
                log.debug("shared-memory view still exported; leaving it to the GC")
