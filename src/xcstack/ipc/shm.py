"""Shared-memory handles for large payloads (tensors) between processes on one host.

The sender copies the bytes once into a named segment and sends a small handle in the frame meta;
the receiver maps the segment and reads it in place. The sender owns the segment and unlinks it
when the call is over (`ShmPool.release`), so a crashed receiver never leaks it.
"""

from __future__ import annotations

import secrets
from multiprocessing import resource_tracker, shared_memory
from typing import Any

DEFAULT_THRESHOLD = 256 * 1024
_CREATED_HERE: set[str] = set()


class ShmPool:
    """Segments created by this process, released explicitly (or all at `close`)."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._live: dict[str, shared_memory.SharedMemory] = {}

    def should_share(self, nbytes: int) -> bool:
        return nbytes >= self.threshold

    def put(self, buf: bytes | bytearray | memoryview) -> dict[str, Any]:
        view = memoryview(buf).cast("B")
        name = "xc" + secrets.token_hex(8)
        seg = shared_memory.SharedMemory(name=name, create=True, size=max(1, view.nbytes))
        assert seg.buf is not None
        seg.buf[: view.nbytes] = view
        self._live[name] = seg
        _CREATED_HERE.add(name)
        return {"shm": name, "size": view.nbytes}

    def release(self, handle: dict[str, Any]) -> None:
        seg = self._live.pop(str(handle["shm"]), None)
        if seg is not None:
            _CREATED_HERE.discard(seg.name)
            seg.close()
            seg.unlink()

    def close(self) -> None:
        for name in list(self._live):
            self.release({"shm": name})

    @property
    def live(self) -> int:
        return len(self._live)


class OpenedSegment:
    """A segment opened by the receiver; `view` is valid until `close()`."""

    def __init__(self, handle: dict[str, Any]) -> None:
        self._seg = shared_memory.SharedMemory(name=str(handle["shm"]), create=False)
        # The creator owns unlinking; keep Python's resource tracker from unlinking it here.
        # (Python < 3.13 registers every attach; a segment created by this very process stays registered.)
        if self._seg.name not in _CREATED_HERE:
            resource_tracker.unregister(self._seg._name, "shared_memory")  # type: ignore[attr-defined]
        assert self._seg.buf is not None
        self.view: memoryview = self._seg.buf[: int(handle["size"])]

    def close(self) -> None:
        self.view.release()
        self._seg.close()

    def __enter__(self) -> OpenedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_handle(handle: dict[str, Any]) -> OpenedSegment:
    return OpenedSegment(handle)


def is_handle(meta: Any) -> bool:
    return isinstance(meta, dict) and "shm" in meta and "size" in meta
