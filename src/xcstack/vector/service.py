"""The vector service: validates input, embeds text, enforces limits, then calls the backend.

Free of HTTP: routes.py maps requests to these methods; tests and the benchmark call them directly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from xcstack.errors import BadRequest, CoreCode, PayloadTooLarge
from xcstack.vector.filters import check_filter
from xcstack.vector.protocol import FIELD_RE, MAX_ID_CHARS, NAME_RE, VectorCode
from xcstack.vector.settings import VectorSettings
from xcstack.vector.store import (
    METRICS,
    CollectionInfo,
    Hit,
    InvalidVector,
    Matrix,
    Metric,
    Record,
    VectorStore,
)

RESERVED_FIELDS = {"id", "vector", "score", "distance", "payload", "$meta"}

InputType = Literal["query", "document"]


class Embedder(Protocol):
    """`LocalEmbedder.embed`: `input_type` picks the model's prefix. Stored texts are documents and search
    texts queries: e5-family models rank passages embedded without `passage: ` poorly."""

    def __call__(self, model: str | None, inputs: list[str],
                 input_type: str | None = None) -> Awaitable[tuple[Any, Any]]: ...


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(
            f"invalid collection name {str(name)[:80]!r}: 1-48 characters, letters, digits and '_', "
            "starting with a letter",
            code=VectorCode.INVALID_COLLECTION_NAME,
            param="name",
        )
    return name


def to_matrix(data: Any, *, what: str = "vectors", dimension: int | None = None) -> Matrix:
    """A finite float32 (n, d) matrix from JSON data; 400 `invalid_vector` otherwise."""
    if not isinstance(data, list) or not data:
        raise InvalidVector(f"{what} must be a non-empty list of vectors", param=what)
    try:
        arr = np.array(data)
    except ValueError:
        raise InvalidVector(f"{what}: every vector must have the same number of elements", param=what) from None
    if arr.dtype.kind not in "fi" or arr.ndim != 2:
        if arr.ndim == 1 and arr.dtype.kind in "fi":
            raise InvalidVector(f"{what} must be a list of vectors (a list of lists of numbers)", param=what)
        raise InvalidVector(f"{what}: every element must be a number", param=what)
    if arr.shape[1] == 0:
        raise InvalidVector(f"{what}: empty vector", param=what)
    with np.errstate(over="ignore"):  # out-of-range values become inf and are rejected just below
        mat = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(mat).all():
        bad = int(np.argwhere(~np.isfinite(mat))[0][0])
        raise InvalidVector(f"{what}[{bad}] contains NaN or infinity (or a value outside float32 range)", param=what)
    if dimension is not None and mat.shape[1] != dimension:
        raise InvalidVector(
            f"{what} have dimension {mat.shape[1]}; the collection has dimension {dimension}", param=what
        )
    return mat


class VectorService:
    def __init__(
        self,
        settings: VectorSettings,
        store: VectorStore,
        embedder: Callable[[], Embedder | None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._embedder = embedder or (lambda: None)
        self._dims: dict[str, int] = {}

    # ---- helpers --------------------------------------------------------------------------

    def _check_batch(self, n: int, what: str) -> None:
        if n > self.settings.max_batch:
            raise PayloadTooLarge(
                f"{n} {what} in one request; the limit is {self.settings.max_batch}",
                code=CoreCode.BATCH_TOO_LARGE, param=what
            )

    async def _dimension(self, name: str) -> int:
        dim = self._dims.get(name)
        if dim is None:
            info = await self.store.describe_collection(name)
            dim = self._dims[name] = info.dimension
        return dim

    async def embed(self, texts: list[str], model: str | None, input_type: InputType) -> Matrix:
        embedder = self._embedder()
        if embedder is None:
            raise BadRequest(
                "text input needs the local embedding model, which is not available here (the inference "
                "capability is disabled or has no embedding model); send vectors instead",
                code=VectorCode.EMBEDDING_UNAVAILABLE,
                param="texts",
            )
        if any(not isinstance(t, str) or not t for t in texts):
            raise BadRequest("texts must be non-empty strings", code=CoreCode.INVALID_PARAMETER, param="texts")
        vectors, _usage = await embedder(model or self.settings.embedding_model, texts, input_type)
        return to_matrix(np.asarray(vectors, dtype=np.float32).tolist(), what="embeddings")

    # ---- collections ----------------------------------------------------------------------

    async def create_collection(
        self, name: str, dimension: int, metric: str = "cosine", description: str = ""
    ) -> CollectionInfo:
        check_name(name)
        if (
            isinstance(dimension, bool)
            or not isinstance(dimension, int)
            or not 1 <= dimension <= self.settings.max_dimension
        ):
            raise InvalidVector(
                f"dimension must be an integer from 1 to {self.settings.max_dimension}", param="dimension"
            )
        if metric not in METRICS:
            raise BadRequest(f"metric must be one of {', '.join(METRICS)}",
                             code=CoreCode.INVALID_PARAMETER, param="metric")
        if len(description) > 1024:
            raise BadRequest(
                "description is longer than 1024 characters", code=CoreCode.INVALID_PARAMETER, param="description"
            )
        existing = await self.store.list_collections()
        if len(existing) >= self.settings.max_collections and name not in existing:
            raise BadRequest(f"collection limit reached ({self.settings.max_collections})",
                             code=VectorCode.TOO_MANY_COLLECTIONS)
        m: Metric = metric  # type: ignore[assignment]
        info = await self.store.create_collection(name, dimension, m, description)
        self._dims[name] = dimension
        return info

    async def list_collections(self) -> list[str]:
        return await self.store.list_collections()

    async def describe_collection(self, name: str) -> CollectionInfo:
        return await self.store.describe_collection(check_name(name))

    async def drop_collection(self, name: str) -> None:
        await self.store.drop_collection(check_name(name))
        self._dims.pop(name, None)

    async def build_index(self, name: str) -> CollectionInfo:
        return await self.store.build_index(check_name(name))

    # ---- rows -----------------------------------------------------------------------------

    async def upsert(
        self,
        name: str,
        *,
        ids: Sequence[str] | None = None,
        vectors: Any = None,
        texts: list[str] | None = None,
        payloads: Sequence[dict[str, Any]] | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        check_name(name)
        if (vectors is None) == (texts is None):
            raise BadRequest("send either 'vectors' or 'texts'", code=CoreCode.INVALID_PARAMETER, param="vectors")
        n = len(vectors) if isinstance(vectors, list) else len(texts) if isinstance(texts, list) else 0
        self._check_batch(n, "rows")
        dim = await self._dimension(name)
        if texts is not None:
            if not isinstance(texts, list) or not texts:
                raise BadRequest("texts must be a non-empty list of strings",
                                 code=CoreCode.INVALID_PARAMETER, param="texts")
            mat = await self.embed(texts, model, "document")
            if mat.shape[1] != dim:
                raise InvalidVector(
                    f"the embedding model returns {mat.shape[1]}-dimensional vectors; collection {name!r} has "
                    f"dimension {dim}",
                    param="texts",
                )
        else:
            mat = to_matrix(vectors, dimension=dim)
        rows = mat.shape[0]
        if ids is None:
            ids = [uuid.uuid4().hex for _ in range(rows)]
        else:
            if not isinstance(ids, list) or len(ids) != rows:
                raise BadRequest(
                    f"ids must be a list of {rows} strings (one per row)", code=CoreCode.INVALID_PARAMETER, param="ids"
                )
            for i in ids:
                if not isinstance(i, str) or not 0 < len(i) <= MAX_ID_CHARS:
                    raise BadRequest(
                        f"every id must be a string of 1-{MAX_ID_CHARS} characters",
                        code=VectorCode.INVALID_ID, param="ids"
                    )
            if len(set(ids)) != rows:
                raise BadRequest("ids contain duplicates", code=VectorCode.DUPLICATE_ID, param="ids")
        if payloads is None:
            payloads = [{} for _ in range(rows)]
        else:
            if not isinstance(payloads, list) or len(payloads) != rows:
                raise BadRequest(
                    f"payloads must be a list of {rows} objects", code=CoreCode.INVALID_PARAMETER, param="payloads"
                )
            for p in payloads:
                self._check_payload(p)
        written = await self.store.upsert(name, list(ids), mat, list(payloads))
        return {"upserted": written, "ids": list(ids)}

    def _check_payload(self, p: Any) -> None:
        if not isinstance(p, dict):
            raise BadRequest("every payload must be a JSON object", code=CoreCode.INVALID_PARAMETER, param="payloads")
        if len(p) > self.settings.max_payload_fields:
            raise BadRequest(
                f"a payload has {len(p)} fields; the limit is {self.settings.max_payload_fields}",
                code=CoreCode.INVALID_PARAMETER,
                param="payloads",
            )
        for key in p:
            if not FIELD_RE.fullmatch(key) or key in RESERVED_FIELDS:
                raise BadRequest(
                    f"invalid payload field {key[:80]!r}: letters, digits, '_' (not starting with a digit), "
                    f"and not one of {', '.join(sorted(RESERVED_FIELDS))}",
                    code=CoreCode.INVALID_PARAMETER,
                    param="payloads",
                )

    async def delete(self, name: str, *, ids: list[str] | None = None, filter: str | None = None) -> dict[str, Any]:
        check_name(name)
        if ids is None and not filter:
            raise BadRequest("send 'ids' and/or 'filter'", code=CoreCode.INVALID_PARAMETER, param="ids")
        if ids is not None:
            if not isinstance(ids, list) or not ids or any(not isinstance(i, str) or not i for i in ids):
                raise BadRequest("ids must be a non-empty list of strings", code=VectorCode.INVALID_ID, param="ids")
            self._check_batch(len(ids), "ids")
        self._check_filter(filter)
        n = await self.store.delete(name, ids, filter)
        return {"deleted": n}

    def _check_filter(self, filter: Any) -> None:
        check_filter(filter)  # type, length and nesting, for every engine (Milvus gets the text as is)

    async def search(
        self,
        name: str,
        *,
        vectors: Any = None,
        texts: list[str] | None = None,
        top_k: int = 10,
        filter: str | None = None,
        output_fields: list[str] | None = None,
        include_vectors: bool = False,
        ef: int | None = None,
        model: str | None = None,
    ) -> list[list[Hit]]:
        check_name(name)
        if (vectors is None) == (texts is None):
            raise BadRequest("send either a vector or a text", code=CoreCode.INVALID_PARAMETER, param="vector")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise BadRequest("top_k must be a positive integer", code=CoreCode.INVALID_PARAMETER, param="top_k")
        if top_k > self.settings.max_top_k:
            raise BadRequest(
                f"top_k {top_k} is above the maximum of {self.settings.max_top_k}",
                code=VectorCode.TOP_K_TOO_LARGE,
                param="top_k",
            )
        if ef is not None and (isinstance(ef, bool) or not isinstance(ef, int) or not 1 <= ef <= 32768):
            raise BadRequest("ef must be an integer from 1 to 32768", code=CoreCode.INVALID_PARAMETER, param="ef")
        if ef is not None and ef < top_k:
            ef = top_k
        self._check_filter(filter)
        if output_fields is not None:
            if not isinstance(output_fields, list) or len(output_fields) > 256:
                raise BadRequest(
                    "output_fields must be a list of field names",
                    code=CoreCode.INVALID_PARAMETER, param="output_fields"
                )
            for f in output_fields:
                if f != "*" and (not isinstance(f, str) or not FIELD_RE.fullmatch(f) or f in RESERVED_FIELDS):
                    raise BadRequest(
                        f"invalid output field {str(f)[:80]!r}", code=CoreCode.INVALID_PARAMETER, param="output_fields"
                    )
        n = len(vectors) if isinstance(vectors, list) else len(texts) if isinstance(texts, list) else 0
        self._check_batch(n, "queries")
        dim = await self._dimension(name)
        if texts is not None:
            mat = await self.embed(texts, model, "query")
            if mat.shape[1] != dim:
                raise InvalidVector(
                    f"the embedding model returns {mat.shape[1]}-dimensional vectors; collection {name!r} has "
                    f"dimension {dim}",
                    param="text",
                )
        else:
            mat = to_matrix(vectors, what="vector", dimension=dim)
        return await self.store.search(
            name, mat, top_k, filter=filter or None, output_fields=output_fields, include_vectors=include_vectors, ef=ef
        )

    def export(
        self, name: str, *, batch_size: int = 1000, filter: str | None = None, include_vectors: bool = True
    ) -> AsyncGenerator[list[Record], None]:
        check_name(name)
        self._check_filter(filter)
        return self.store.export(name, batch_size=batch_size, filter=filter, include_vectors=include_vectors)


def make_store(settings: VectorSettings, data_dir: Path) -> VectorStore:
    if settings.backend == "pgvector":
        from xcstack.vector.pgvector import PgvectorStore

        return PgvectorStore(settings)
    from xcstack.vector.milvus import MilvusStore

    return MilvusStore(settings, data_dir)


def now() -> float:
    return time.time()
