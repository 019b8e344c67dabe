"""HTTP adapter for the vector service: `/v1/vectors/...`.

POST   /v1/vectors/collections                 create {name, dimension, metric?, description?}
GET    /v1/vectors/collections                 list
GET    /v1/vectors/collections/{name}          describe (count, index state)
DELETE /v1/vectors/collections/{name}          drop
POST   /v1/vectors/collections/{name}/index    build/rebuild + load the index now (explicit)
POST   /v1/vectors/{collection}/upsert         {ids?, vectors | texts, payloads?, model?}
POST   /v1/vectors/{collection}/search         {vector | vectors | text | texts, top_k?, filter?,
                                                output_fields?, include_vectors?, ef?, model?}
POST   /v1/vectors/{collection}/delete         {ids?, filter?}
GET    /v1/vectors/{collection}/export         NDJSON stream of rows (?filter=&vectors=false); a failure
                                                after the stream started is its last line, {"error": {...}}

Bodies are parsed with the strict models of protocol.py (also the OpenAPI contract, via `@api`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import NDJSON, api
from xcstack.errors import BadRequest, CoreCode, XCError
from xcstack.httputil import JSONResponse, dumps, read_json, validation_error
from xcstack.security.guard import audit, authorize, requires
from xcstack.vector import protocol as p
from xcstack.vector.service import VectorService, check_name
from xcstack.vector.store import Record

log = logging.getLogger("xcstack.vector")
M = TypeVar("M", bound=BaseModel)

#: a bad value of these fields keeps the code the service gives it (docs/vectors.md, Errors); the
#: other fields' are `invalid_parameter`
_FIELD_CODES: dict[str, str] = {
    "name": p.VectorCode.INVALID_COLLECTION_NAME,
    "dimension": p.VectorCode.INVALID_VECTOR,
    "vector": p.VectorCode.INVALID_VECTOR,
    "vectors": p.VectorCode.INVALID_VECTOR,
    "ids": p.VectorCode.INVALID_ID,
    "filter": p.VectorCode.INVALID_FILTER,
}


def _parse(data: Any, model: type[M], codes: dict[str, str] = _FIELD_CODES) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = validation_error(exc)
        loc = exc.errors()[0]["loc"]
        err.code = codes.get(str(loc[0]) if loc else "", err.code)
        raise err from None


def _object(data: Any, model: type[BaseModel]) -> dict[str, Any]:
    """A JSON object with only `model`'s fields (the unknown ones are named with the allowed ones)."""
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code=CoreCode.INVALID_PARAMETER)
    allowed = set(model.model_fields)
    unknown = set(data) - allowed
    if unknown:
        raise BadRequest(
            f"unknown field(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}",
            code=CoreCode.INVALID_PARAMETER,
            param=sorted(unknown)[0],
        )
    return data


async def _body(request: Request, model: type[M]) -> M:
    return _parse(_object(await read_json(request), model), model)


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _flag(raw: str, name: str) -> bool:
    value = _FLAGS.get(raw.lower())
    if value is None:
        raise BadRequest(f"{name} must be true or false", code=CoreCode.INVALID_PARAMETER, param=name)
    return value


_CHECK = "Also `collection:<name>` / `{}` on the collection (RBAC)."
_ROWS = (
    "Unknown collection: 404 `collection_not_found`; more rows/queries/ids than `[vector] max_batch`: 413 "
    "`batch_too_large`; a bad vector (dimension, NaN/inf, ragged, not numbers): 400 `invalid_vector`; a bad "
    "filter: 400 `invalid_filter` / `filter_too_deep`; engine down, pool busy or slow: 503 "
    "`vector_backend_unavailable` / `vector_pool_exhausted` / `vector_backend_timeout` (Retry-After)."
)
_EXPORT = (
    'NDJSON, one row per line: `{"id": str, "payload": {...}, "vector": [numbers]}` (`vector` unless '
    '`vectors=false`). A failure after the 200 head is the last line, `{"error": {"type", "code", '
    '"message"}}` (rows always have `id`): check the last line.'
)


def build_routes(service: VectorService) -> list[BaseRoute]:
    @api(
        "Create a collection",
        body=p.CreateCollection,
        response=p.CollectionInfo,
        status=201,
        errors=(409,),
        checks=_CHECK.format("admin"),
        description="Twice: 409 `collection_exists`; over `[vector] "
        "max_collections`: 400 `too_many_collections`. Audited (`vector.collection.create`).",
    )
    @requires("vector", "admin")
    async def create_collection(request: Request) -> Response:
        data = _object(await read_json(request), p.CreateCollection)
        name = check_name(data.get("name"))  # type: ignore[arg-type]  # the permission names it
        await authorize(request, f"collection:{name}", "admin")
        body = _parse(data, p.CreateCollection)
        info = await service.create_collection(name, body.dimension, body.metric or "cosine", body.description or "")
        await audit(
            request,
            "vector.collection.create",
            f"collection:{name}",
            "ok",
            {"dimension": info.dimension, "metric": info.metric},
        )
        return JSONResponse(info.as_dict(), status_code=201)

    @api("List the collections", response=p.CollectionList)
    @requires("vector", "read")
    async def list_collections(request: Request) -> Response:
        names = await service.list_collections()
        return JSONResponse({"object": "list", "data": names})

    @api(
        "Describe a collection: dimension, metric, row count, index state",
        response=p.CollectionInfo,
        errors=(404,),
        checks=_CHECK.format("read"),
    )
    @requires("vector", "read")
    async def describe_collection(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "read")
        return JSONResponse((await service.describe_collection(name)).as_dict())

    @api(
        "Drop a collection and its rows",
        response=p.CollectionDropped,
        errors=(404,),
        checks=_CHECK.format("admin"),
        description="Audited (`vector.collection.drop`).",
    )
    @requires("vector", "admin")
    async def drop_collection(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "admin")
        await service.drop_collection(name)
        await audit(request, "vector.collection.drop", f"collection:{name}", "ok")
        return JSONResponse({"name": name, "dropped": True})

    @api(
        "Build (or rebuild) and load the collection's index now",
        response=p.CollectionInfo,
        errors=(404,),
        checks=_CHECK.format("admin"),
        description="Answers when the index is ready, with the collection's description. A build already "
        "running (pgvector): 503 `vector_backend_unavailable`. Audited (`vector.collection.index`).",
    )
    @requires("vector", "admin")
    async def build_index(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "admin")
        info = await service.build_index(name)
        await audit(request, "vector.collection.index", f"collection:{name}", "ok")
        return JSONResponse(info.as_dict())

    @api(
        "Insert or replace rows (vectors, or texts embedded by the local model)",
        body=p.UpsertRequest,
        response=p.UpsertResult,
        errors=(404,),
        checks=_CHECK.format("write"),
        description="An upsert replaces the whole row. Ids: 400 `invalid_id` / `duplicate_id`; text input "
        "without a local embedding model: 400 `embedding_unavailable`. " + _ROWS,
    )
    @requires("vector", "write")
    async def upsert(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "write")
        body = await _body(request, p.UpsertRequest)
        out = await service.upsert(
            name, ids=body.ids, vectors=body.vectors, texts=body.texts, payloads=body.payloads, model=body.model
        )
        return JSONResponse(out)

    @api(
        "Nearest neighbours of a vector or text (or of several, one list each)",
        body=p.SearchRequest,
        response=p.SearchResult,
        errors=(404,),
        checks=_CHECK.format("read"),
        description="Scores: cosine similarity and inner product (higher is closer), L2 distance (lower is "
        "closer). `top_k` over `[vector] max_top_k`: 400 `top_k_too_large`; text input without a "
        "local embedding model: 400 `embedding_unavailable`. " + _ROWS,
    )
    @requires("vector", "read")
    async def search(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "read")
        body = await _body(request, p.SearchRequest)
        given = [k for k in ("vector", "vectors", "text", "texts") if getattr(body, k) is not None]
        if len(given) != 1:
            raise BadRequest(
                "send exactly one of vector, vectors, text, texts", code=CoreCode.INVALID_PARAMETER, param="vector"
            )
        single = body.vector is not None or body.text is not None
        vectors = [body.vector] if body.vector is not None else body.vectors
        texts = [body.text] if body.text is not None else body.texts
        results = await service.search(
            name,
            vectors=vectors,
            texts=texts,
            top_k=body.top_k,
            filter=body.filter,
            output_fields=body.output_fields,
            include_vectors=bool(body.include_vectors),
            ef=body.ef,
            model=body.model,
        )
        out = [[h.as_dict() for h in hits] for hits in results]
        return JSONResponse({"object": "search_result", "data": out[0] if single else out})

    @api(
        "Delete rows by ids and/or filter",
        body=p.DeleteRequest,
        response=p.DeleteResult,
        errors=(404,),
        checks=_CHECK.format("write"),
        description="Neither ids nor a filter: 400 `invalid_parameter`. " + _ROWS,
    )
    @requires("vector", "write")
    async def delete(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "write")
        body = await _body(request, p.DeleteRequest)
        out = await service.delete(name, ids=body.ids, filter=body.filter)
        return JSONResponse(out)

    @api(
        "Export every row (or those a filter matches) as an NDJSON stream",
        query=p.ExportQuery,
        streams={NDJSON: _EXPORT},
        errors=(404,),
        checks=_CHECK.format("read"),
        description="The first batch is read before the 200 head: an unknown collection or a bad filter is a "
        "JSON error with its status (404 `collection_not_found`, 400 `invalid_filter`). Audited at "
        "its end (`vector.export`: ok, failure or aborted). " + _EXPORT,
    )
    @requires("vector", "read")
    async def export(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "read")
        with_vectors = _flag(request.query_params.get("vectors", "true"), "vectors")
        given = {k: request.query_params[k] for k in ("filter", "vectors") if k in request.query_params}
        filt = _parse(given, p.ExportQuery, {"filter": p.VectorCode.INVALID_FILTER}).filter or None
        await service.describe_collection(name)  # 404 before the stream starts
        batches = service.export(name, filter=filt, include_vectors=with_vectors)
        # The first batch is read before the response starts, so that whatever the engine rejects (a bad
        # filter, a missing table) is a JSON error with its status, not a broken 200.
        first = await anext(batches, None)

        def encode(batch: list[Record]) -> bytes:
            return b"".join(
                dumps({"id": r.id, "payload": r.payload, **({"vector": r.vector} if with_vectors else {})}) + b"\n"
                for r in batch
            )

        async def lines() -> AsyncIterator[bytes]:
            rows = 0
            outcome, error = "aborted", None  # aborted: the client went away (the stream was cancelled)
            try:
                batch = first
                while batch is not None:
                    rows += len(batch)
                    yield encode(batch)
                    batch = await anext(batches, None)
                outcome = "ok"
            except Exception as exc:
                # The 200 head is out: the error goes as the last NDJSON line, `{"error": {...}}`, where
                # every row has an "id"; clients must check it (documented in docs/vectors.md).
                err = exc if isinstance(exc, XCError) else XCError("export failed on the server")
                if not isinstance(exc, XCError):
                    log.exception("vector export of %s failed after %d rows", name, rows)
                outcome, error = "failure", err.code
                yield dumps(err.body()) + b"\n"
            finally:
                with anyio.CancelScope(shield=True):
                    await batches.aclose()
                    detail = {"rows": rows, "filter": filt is not None, **({"error": error} if error else {})}
                    await audit(request, "vector.export", f"collection:{name}", outcome, detail)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return [
        Route("/v1/vectors/collections", create_collection, methods=["POST"]),
        Route("/v1/vectors/collections", list_collections, methods=["GET"]),
        Route("/v1/vectors/collections/{name}", describe_collection, methods=["GET"]),
        Route("/v1/vectors/collections/{name}", drop_collection, methods=["DELETE"]),
        Route("/v1/vectors/collections/{name}/index", build_index, methods=["POST"]),
        Route("/v1/vectors/{collection}/upsert", upsert, methods=["POST"]),
        Route("/v1/vectors/{collection}/search", search, methods=["POST"]),
        Route("/v1/vectors/{collection}/delete", delete, methods=["POST"]),
        Route("/v1/vectors/{collection}/export", export, methods=["GET"]),
    ]
