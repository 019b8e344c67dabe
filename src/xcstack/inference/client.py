"""The http side's way to the models: a backend that routes to model worker processes over IPC
(production) or runs a `WorkerCore` inline (tests, tiny deployments). Both raise `XCError`s:

    queue full / worker down / worker stopping  -> 503 + Retry-After (retriable)
    deadline passed                              -> 504 inference_timeout
    batch failed                                 -> 500 inference_failed (that batch only)
    unknown / unloaded model                     -> 404 model_not_found / 503 model_unavailable
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from xcstack.errors import BadRequest, CoreCode, GatewayTimeout, NotFound, Overloaded, XCError
from xcstack.inference import metrics
from xcstack.inference.batcher import WorkerCode
from xcstack.inference.core import CoreError, WorkerCore
from xcstack.inference.protocol import InferenceCode
from xcstack.inference.repository import ModelRepository
from xcstack.inference.settings import InferenceSettings
from xcstack.inference.tensors import encode_bytes_tensor, pack, unpack

log = logging.getLogger("xcstack.inference")


def http_error(code: str, message: str, retriable: bool, retry_after: float = 1.0) -> XCError:
    """A model worker's IPC failure (WorkerCode) as the HTTP error the client gets (catalogue codes)."""
    if code == WorkerCode.MODEL_NOT_FOUND:
        return NotFound(message, code=CoreCode.MODEL_NOT_FOUND)
    if code == WorkerCode.DEADLINE_EXCEEDED:
        return GatewayTimeout(message, code=InferenceCode.INFERENCE_TIMEOUT)
    if code in _BAD_REQUEST:
        return BadRequest(message, code=_BAD_REQUEST[code])
    if code == WorkerCode.BATCH_FAILED:
        return XCError(message, code=InferenceCode.INFERENCE_FAILED, status=500)
    if retriable or code in _OVERLOADED:
        return Overloaded(message, code=_OVERLOADED.get(code, InferenceCode.MODEL_WORKER_UNAVAILABLE),
                          retry_after=retry_after)
    return XCError(message, code=InferenceCode.INFERENCE_FAILED, status=500)


_BAD_REQUEST: dict[str, InferenceCode] = {WorkerCode.NOT_AN_EMBEDDING_MODEL: InferenceCode.NOT_AN_EMBEDDING_MODEL,
                WorkerCode.NOT_A_RERANK_MODEL: InferenceCode.NOT_A_RERANK_MODEL,
                WorkerCode.REQUEST_TOO_LARGE: InferenceCode.REQUEST_TOO_LARGE}
_OVERLOADED: dict[str, InferenceCode] = {WorkerCode.QUEUE_FULL: InferenceCode.QUEUE_FULL,
               WorkerCode.MODEL_UNAVAILABLE: InferenceCode.MODEL_UNAVAILABLE,
               WorkerCode.WORKER_STOPPING: InferenceCode.WORKER_STOPPING,
               WorkerCode.BUSY: InferenceCode.WORKER_BUSY}


class Backend(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]: ...

    async def model_ready(self, model: str) -> bool: ...

    async def embed(self, model: str, texts: Sequence[str], timeout: float) -> tuple[np.ndarray, int]: ...

    async def rerank(self, model: str, query: str, documents: Sequence[str], timeout: float
                     ) -> tuple[np.ndarray, int]: ...

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, timeout: float
    ) -> dict[str, np.ndarray]: ...


class InlineBackend:
    """The worker core in this process (its runs go to one thread per model)."""

    def __init__(self, repo: ModelRepository, settings: InferenceSettings) -> None:
        self.settings = settings
        self.core = WorkerCore(repo, settings)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.core.load)
        self.core.start()

    async def stop(self) -> None:
        await self.core.close()

    async def model_ready(self, model: str) -> bool:
        return model in self.core.models

    async def ready(self) -> tuple[bool, str]:
        if self.core.errors and not self.core.models:
            return False, "; ".join(self.core.errors.values())
        return True, f"inline: {len(self.core.models)} model(s) loaded"

    async def embed(self, model: str, texts: Sequence[str], timeout: float) -> tuple[np.ndarray, int]:
        try:
            return await self.core.embed(model, texts, timeout)
        except CoreError as exc:
            raise http_error(exc.code, exc.message, exc.retriable, self.settings.retry_after_s) from None

    async def rerank(self, model: str, query: str, documents: Sequence[str], timeout: float
                     ) -> tuple[np.ndarray, int]:
        try:
            return await self.core.rerank(model, query, documents, timeout)
        except CoreError as exc:
            raise http_error(exc.code, exc.message, exc.retriable, self.settings.retry_after_s) from None

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, timeout: float
    ) -> dict[str, np.ndarray]:
        try:
            return await self.core.infer(model, inputs, outputs, timeout)
        except CoreError as exc:
            raise http_error(exc.code, exc.message, exc.retriable, self.settings.retry_after_s) from None


class ProcessBackend:
    """Clients of the model worker processes; a model's requests go to the least-loaded worker holding it."""

    def __init__(self, repo: ModelRepository, settings: InferenceSettings, sockets: Sequence[str]) -> None:
        from xcstack.ipc.channel import IPCClient
        from xcstack.ipc.shm import ShmPool

        self.repo = repo
        self.settings = settings
        self.total = len(sockets)
        self.clients = [IPCClient(p, connect_timeout=settings.connect_timeout_s) for p in sockets]
        self.shm = ShmPool(settings.shm_threshold_bytes) if settings.shm_threshold_bytes > 0 else None
        self.holders: dict[str, list[int]] = {c.name: c.workers_for(self.total) for c in repo.models()}
        self.shm_calls = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        if self.shm is not None:
            self.shm.close()

    def _order(self, model: str) -> list[int]:
        holders = self.holders.get(model)
        if not holders:
            raise NotFound(f"model {model!r} is not in the model repository", code=CoreCode.MODEL_NOT_FOUND)
        start = zlib.crc32(model.encode()) % len(holders)
        rotated = holders[start:] + holders[:start]
        return sorted(rotated, key=lambda i: self.clients[i].inflight)  # stable: hash order breaks ties

    async def _call(self, model: str, op: str, meta: dict[str, Any], payload: Any, timeout: float) -> Any:
        from xcstack.ipc.channel import IPCRemoteError, IPCTimeout, IPCUnavailable

        order = self._order(model)
        last: Exception | None = None
        for attempt, idx in enumerate(order[:2]):  # a dead worker: one try on another holder, then 503
            try:
                return await self.clients[idx].call(op, meta, payload, timeout=timeout + 0.5)
            except IPCUnavailable as exc:
                metrics.WORKER_RESTARTS.labels(str(idx)).inc()
                last = exc
                log.warning("model worker %d unavailable (%s); attempt %d", idx, exc, attempt + 1)
                continue
            except IPCTimeout:
                raise GatewayTimeout(
                    f"model {model}: no answer within {timeout:.3g}s", code=InferenceCode.INFERENCE_TIMEOUT
                ) from None
            except IPCRemoteError as exc:
                if exc.code == WorkerCode.WORKER_STOPPING:  # draining: another holder may take it
                    last = exc
                    continue
                raise http_error(exc.code, exc.message, exc.retriable, self.settings.retry_after_s) from None
        raise Overloaded(
            f"model {model}: model worker unavailable ({last}); retry", code=InferenceCode.MODEL_WORKER_UNAVAILABLE,
            retry_after=self.settings.retry_after_s,
        )

    async def ready(self) -> tuple[bool, str]:
        from xcstack.ipc.channel import IPCError

        down: list[str] = []
        for i, c in enumerate(self.clients):
            if not any(i in h for h in self.holders.values()):
                continue
            try:
                await c.call("health", {}, timeout=1.0)
            except IPCError as exc:
                down.append(f"worker {i}: {exc}")
        if down:
            return False, "; ".join(down)
        return True, f"{self.total} model worker(s), {len(self.holders)} model(s)"

    async def model_ready(self, model: str) -> bool:
        """True when at least one worker holding `model` answers and has it loaded."""
        from xcstack.ipc.channel import IPCError

        for idx in self.holders.get(model, []):
            try:
                meta, _ = await self.clients[idx].call("health", {}, timeout=1.0)
            except IPCError:
                continue
            if model in meta.get("models", {}):
                return True
        return False

    async def embed(self, model: str, texts: Sequence[str], timeout: float) -> tuple[np.ndarray, int]:
        # texts travel in the payload (BYTES layout), never in the msgpack meta, whose size is capped
        raw = encode_bytes_tensor(np.array([t.encode("utf-8", "surrogatepass") for t in texts], dtype=object))
        meta, payload = await self._call(
            model, "embed", {"model": model, "count": len(texts), "timeout": timeout}, raw, timeout
        )
        arr = np.frombuffer(payload, dtype="<f4").reshape(meta["shape"])
        return arr, int(meta["tokens"])

    async def rerank(self, model: str, query: str, documents: Sequence[str], timeout: float
                     ) -> tuple[np.ndarray, int]:
        texts = [query, *documents]  # in the payload, like embed's texts
        raw = encode_bytes_tensor(np.array([t.encode("utf-8", "surrogatepass") for t in texts], dtype=object))
        meta, payload = await self._call(
            model, "rerank", {"model": model, "count": len(texts), "timeout": timeout}, raw, timeout
        )
        return np.frombuffer(payload, dtype="<f4").copy(), int(meta["tokens"])

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, timeout: float
    ) -> dict[str, np.ndarray]:
        packed = pack(inputs)
        meta: dict[str, Any] = {"model": model, "tensors": packed.descriptors, "timeout": timeout}
        if outputs:
            meta["outputs"] = list(outputs)
        handle = None
        payload: Any = packed.parts[0] if len(packed.parts) == 1 else packed.payload()
        if self.shm is not None and self.shm.should_share(packed.nbytes):
            handle = self.shm.put(payload)
            meta["shm"] = handle
            payload = b""
            self.shm_calls += 1
        try:
            rmeta, rpayload = await self._call(model, "infer", meta, payload, timeout)
        finally:
            if handle is not None and self.shm is not None:
                self.shm.release(handle)
        return unpack(rmeta["tensors"], rpayload)
