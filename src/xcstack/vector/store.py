"""The `VectorStore` protocol every backend implements, its value types and its errors.

Backends receive input that the service layer has already validated (names, dimensions, finite
float32 matrices, batch sizes, top-k caps); they own the engine-specific parts: storage layout,
index build/load, filter translation, pools and health.

Scores are uniform across backends: `cosine` → cosine similarity (higher is closer), `ip` → inner
product (higher is closer), `l2` → Euclidean distance (lower is closer).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from xcstack.errors import BadRequest, Conflict, NotFound, Overloaded
from xcstack.vector.protocol import VectorCode

Metric = Literal["cosine", "l2", "ip"]
METRICS: tuple[Metric, ...] = ("cosine", "l2", "ip")
Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    dimension: int
    metric: Metric
    count: int | None = None
    description: str = ""
    index: dict[str, Any] = field(default_factory=dict)
    """index type, parameters and state (`ready`, `building`, `pending`), backend-specific keys."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimension": self.dimension,
            "metric": self.metric,
            "count": self.count,
            "description": self.description,
            "index": self.index,
        }


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] | None = None
    vector: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "score": self.score}
        if self.payload is not None:
            out["payload"] = self.payload
        if self.vector is not None:
            out["vector"] = self.vector
        return out


@dataclass(frozen=True)
class Record:
    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None


@runtime_checkable
class VectorStore(Protocol):
    """One vector engine. All methods are coroutines that never block the loop."""

    backend: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> tuple[bool, str]:
        """(healthy?, detail) — cheap, from the last health check; never waits on the engine."""
        ...

    async def create_collection(
        self, name: str, dimension: int, metric: Metric, description: str = ""
    ) -> CollectionInfo:
        """Create a collection; `Conflict` (409) if it exists."""
        ...

    async def list_collections(self) -> list[str]: ...

    async def describe_collection(self, name: str) -> CollectionInfo:
        """The collection's schema, row count and index state; `CollectionNotFound` if absent."""
        ...

    async def drop_collection(self, name: str) -> None: ...

    async def upsert(self, name: str, ids: Sequence[str], vectors: Matrix, payloads: Sequence[dict[str, Any]]) -> int:
        """Insert or replace rows; returns the number written."""
        ...

    async def delete(self, name: str, ids: Sequence[str] | None = None, filter: str | None = None) -> int | None:
        """Delete by ids and/or filter; returns the number deleted when the engine reports it."""
        ...

    async def count(self, name: str) -> int: ...

    async def search(
        self,
        name: str,
        vectors: Matrix,
        top_k: int,
        *,
        filter: str | None = None,
        output_fields: Sequence[str] | None = None,
        include_vectors: bool = False,
        ef: int | None = None,
    ) -> list[list[Hit]]:
        """Top-k per query row. `output_fields`: payload keys to return (None: none, ["*"]: all)."""
        ...

    def export(
        self, name: str, *, batch_size: int = 1000, filter: str | None = None, include_vectors: bool = True
    ) -> AsyncGenerator[list[Record], None]:
        """Stream every row (for exports), in batches; bounded memory."""
        ...

    async def build_index(self, name: str) -> CollectionInfo:
        """Build (or rebuild) and load the collection's index now; progress goes to the log."""
        ...


# ---- errors: stable codes clients can switch on ------------------------------------------------


class CollectionNotFound(NotFound):
    code = VectorCode.COLLECTION_NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} does not exist", param="collection")


class CollectionExists(Conflict):
    code = VectorCode.COLLECTION_EXISTS

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} already exists", param="name")


class InvalidFilter(BadRequest):
    code = VectorCode.INVALID_FILTER

    def __init__(self, message: str) -> None:
        super().__init__(f"invalid filter: {message}", param="filter")


class FilterTooDeep(InvalidFilter):
    """Nesting is bounded: Milvus Lite's recursive parser overflows its stack past ~100 levels (a 500)."""

    code = VectorCode.FILTER_TOO_DEEP


class InvalidVector(BadRequest):
    code = VectorCode.INVALID_VECTOR


class PoolExhausted(Overloaded):
    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after, code=VectorCode.VECTOR_POOL_EXHAUSTED)


class BackendUnavailable(Overloaded):
    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after, code=VectorCode.VECTOR_BACKEND_UNAVAILABLE)


class BackendTimeout(Overloaded):
    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after, code=VectorCode.VECTOR_BACKEND_TIMEOUT)
