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
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from xcstack.errors import BadRequest, XCError
from xcstack.httputil import JSONResponse, dumps, read_json
from xcstack.security.guard import audit, authorize, requires
from xcstack.vector.service import VectorService, check_name
from xcstack.vector.store import Record

log = logging.getLogger("xcstack.vector")

_CREATE_KEYS = {"name", "dimension", "metric", "description"}
_UPSERT_KEYS = {"ids", "vectors", "texts", "payloads", "model"}
_SEARCH_KEYS = {
    "vector",
    "vectors",
    "text",
    "texts",
    "top_k",
    "filter",
    "output_fields",
    "include_vectors",
    "ef",
    "model",
}
_DELETE_KEYS = {"ids", "filter"}


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_parameter")
    unknown = set(data) - allowed
    if unknown:
        raise BadRequest(
            f"unknown field(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}",
            code="invalid_parameter",
            param=sorted(unknown)[0],
        )
    return data


def _opt(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise BadRequest(f"{key} must be {what}", code="invalid_parameter", param=key)
    return value


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _flag(raw: str, name: str) -> bool:
    value = _FLAGS.get(raw.lower())
    if value is None:
        raise BadRequest(f"{name} must be true or false", code="invalid_parameter", param=name)
    return value


def build_routes(service: VectorService) -> list[BaseRoute]:
    @requires("vector", "admin")
    async def create_collection(request: Request) -> Response:
        data = await _body(request, _CREATE_KEYS)
        name = check_name(data.get("name"))  # type: ignore[arg-type]
        await authorize(request, f"collection:{name}", "admin")
        info = await service.create_collection(
            name,
            data.get("dimension"),  # type: ignore[arg-type]
            _opt(data, "metric", str, "a string") or "cosine",
            _opt(data, "description", str, "a string") or "",
        )
        await audit(
            request,
            "vector.collection.create",
            f"collection:{name}",
            "ok",
            {"dimension": info.dimension, "metric": info.metric},
        )
        return JSONResponse(info.as_dict(), status_code=201)

    @requires("vector", "read")
    async def list_collections(request: Request) -> Response:
        names = await service.list_collections()
        return JSONResponse({"object": "list", "data": names})

    @requires("vector", "read")
    async def describe_collection(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "read")
        return JSONResponse((await service.describe_collection(name)).as_dict())

    @requires("vector", "admin")
    async def drop_collection(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "admin")
        await service.drop_collection(name)
        await audit(request, "vector.collection.drop", f"collection:{name}", "ok")
        return JSONResponse({"name": name, "dropped": True})

    @requires("vector", "admin")
    async def build_index(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        await authorize(request, f"collection:{name}", "admin")
        info = await service.build_index(name)
        await audit(request, "vector.collection.index", f"collection:{name}", "ok")
        return JSONResponse(info.as_dict())

    @requires("vector", "write")
    async def upsert(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "write")
        data = await _body(request, _UPSERT_KEYS)
        out = await service.upsert(
            name,
            ids=data.get("ids"),
            vectors=data.get("vectors"),
            texts=data.get("texts"),
            payloads=data.get("payloads"),
            model=_opt(data, "model", str, "a string"),
        )
        return JSONResponse(out)

    @requires("vector", "read")
    async def search(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "read")
        data = await _body(request, _SEARCH_KEYS)
        given = [k for k in ("vector", "vectors", "text", "texts") if data.get(k) is not None]
        if len(given) != 1:
            raise BadRequest(
                "send exactly one of vector, vectors, text, texts", code="invalid_parameter", param="vector"
            )
        key = given[0]
        single = key in ("vector", "text")
        value = data[key]
        vectors = texts = None
        if key in ("vector", "vectors"):
            vectors = [value] if single else value
        else:
            if single and not isinstance(value, str):
                raise BadRequest("text must be a string", code="invalid_parameter", param="text")
            texts = [value] if single else value
            if not isinstance(texts, list):
                raise BadRequest("texts must be a list of strings", code="invalid_parameter", param="texts")
        top_k = data.get("top_k", 10)
        results = await service.search(
            name,
            vectors=vectors,
            texts=texts,
            top_k=top_k,
            filter=data.get("filter"),
            output_fields=data.get("output_fields"),
            include_vectors=bool(_opt(data, "include_vectors", bool, "true or false")),
            ef=data.get("ef"),
            model=_opt(data, "model", str, "a string"),
        )
        out = [[h.as_dict() for h in hits] for hits in results]
        return JSONResponse({"object": "search_result", "data": out[0] if single else out})

    @requires("vector", "write")
    async def delete(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "write")
        data = await _body(request, _DELETE_KEYS)
        out = await service.delete(name, ids=data.get("ids"), filter=data.get("filter"))
        return JSONResponse(out)

    @requires("vector", "read")
    async def export(request: Request) -> Response:
        name = check_name(request.path_params["collection"])
        await authorize(request, f"collection:{name}", "read")
        filt = request.query_params.get("filter") or None
        with_vectors = _flag(request.query_params.get("vectors", "true"), "vectors")
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
