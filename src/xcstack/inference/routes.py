"""HTTP adapter of the inference capability: KServe v2 (`/v2/...`) and OpenAI `/v1/embeddings`, over
the local models service (`inference.local.LocalModels`). `/v1/embeddings` is mounted only when the
inference capability owns it (the gateway's, otherwise; see `app.embeddings_owner`).

While a request waits for its batch, `CancelOnDisconnect` watches for the client's `http.disconnect`:
a client that leaves cancels its work (queued rows leave the batcher; the model worker gets an IPC
CANCEL frame), the request is counted in `xc_inference_departed_total` and nothing is sent (499 in the
access metrics).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import ApiDoc, api, api_for
from xcstack.disconnect import CancelOnDisconnect, ClientDisconnected, DepartedResponse
from xcstack.errors import BadRequest, CoreCode, NotFound, Overloaded, PayloadTooLarge, XCError
from xcstack.httputil import JSONResponse, content_length, loads, parse_model, probe_body, read_model
from xcstack.inference import metrics
from xcstack.inference.kserve import decode_infer_request, decompress, encode_infer_response
from xcstack.inference.protocol import (
    HEADER_LENGTH,
    EmbeddingsRequest,
    EmbeddingsResponse,
    InferenceCode,
    InferRequestJSON,
    InferResponseJSON,
    ModelMetadata,
    ModelReady,
    ReadyProbe,
    RepositoryIndex,
    RepositoryIndexRequest,
    ServerLive,
    ServerMetadata,
    embeddings_response,
)
from xcstack.inference.repository import ModelConfig
from xcstack.security.guard import authorize, requires, requires_route

if TYPE_CHECKING:
    from xcstack.inference.local import LocalModels


OFFLOAD_BYTES = 256 * 1024  # bodies/results above this are decoded/encoded off the event loop
_BINARY_REQUEST = (
    "KServe v2 binary tensor extension: a JSON header (the `application/json` form, with "
    "`parameters.binary_data_size` on each binary input), then the inputs' raw bytes in input order. The "
    "header's length in bytes is in the `Inference-Header-Content-Length` request header. Tensors are "
    "little-endian, row-major; a BYTES element is a 4-byte little-endian length, then its bytes.")
_BINARY_RESPONSE = (
    "Answered when an output has `binary_data` (or `binary_data_output`): the JSON header (the "
    "`application/json` form, with `parameters.binary_data_size` on each binary output), then the outputs' "
    "raw bytes in output order; the header's length is in the `Inference-Header-Content-Length` response header.")
_INFER_DESCRIPTION = (
    "The body is the JSON request, or (binary tensor extension) a JSON header of "
    "`Inference-Header-Content-Length` bytes followed by raw tensor bytes; `Content-Encoding: gzip` or "
    "`deflate` is accepted. Each input must match the model's metadata (name, datatype, shape, `max_batch_size`) "
    "and its limits (`max_tensor_bytes`; a text input's count and length). Errors come as KServe v2 clients "
    "read them: `{\"error\": \"<message>\", \"code\", \"type\", \"param\"}` (`param` names the tensor).")
_MODEL_503 = {"anyOf": [ModelReady.model_json_schema(), {"$ref": "#/components/schemas/KServeOrError"}]}


def _decode(body: bytes, encoding: str | None, limit: int, hlen: str | None, cfg: Any, max_chars: int) -> Any:
    return decode_infer_request(decompress(body, encoding, limit), hlen, cfg, max_chars)


Endpoint = Callable[[Any, Request], Awaitable[Response]]


def kserve_errors(fn: Endpoint) -> Endpoint:
    """KServe v2 clients (tritonclient) read `{"error": "<message>"}`: on /v2 routes the error body keeps
    that shape and carries xcstack's stable `code`, `type` and `param` beside it."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Request) -> Response:
        try:
            return await fn(self, request)
        except XCError as exc:
            body: dict[str, Any] = {"error": exc.message, "code": exc.code, "type": exc.type}
            if exc.param is not None:
                body["param"] = exc.param
            return JSONResponse(body, status_code=exc.status, headers=exc.headers or None)

    return wrapper


class InferenceRoutes:
    def __init__(self, models: LocalModels) -> None:
        self.models = models

    def routes(self, *, embeddings: bool = True) -> list[BaseRoute]:
        # Starlette tries routes in order (a regex each): the hot ones first.
        r: list[BaseRoute] = [Route("/v1/embeddings", self.embeddings, methods=["POST"])] if embeddings else []
        r += [
            Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2/models/{name}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{name}/config", self.model_config, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/v2/repository/index", self.repository_index, methods=["POST", "GET"]),
        ]
        return r

    async def _turn(self) -> None:
        await self.models.turn()

    # --- health and metadata ---------------------------------------------------------------------
    @requires_route
    @api("KServe v2 server metadata", response=ServerMetadata)
    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "xcstack", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    @requires_route
    @api("KServe v2 liveness", response=ServerLive)
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    @requires_route
    @api("KServe v2 readiness of the inference server (details only for an authenticated caller)",
         response=ReadyProbe, also={503: ReadyProbe})
    async def ready(self, request: Request) -> Response:
        ok, detail = await self.models.ready()
        return JSONResponse(probe_body(request.scope, ok, detail), status_code=200 if ok else 503)

    async def _allowed_config(self, request: Request, action: str) -> Any:
        """The model's config, after the caller's permission on it: permission first, so that a caller
        without it cannot probe which models exist (403, never 404)."""
        await authorize(request, f"model:{request.path_params['name']}", action)
        return self._config(request)

    def _config(self, request: Request) -> Any:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        entry = self.models.repo.get(name)
        if entry is None or (version is not None and version != "1"):
            raise NotFound(f"model {name!r}{' version ' + version if version else ''} is not in the repository",
                           code=CoreCode.MODEL_NOT_FOUND)
        if entry.config is None:
            raise Overloaded(f"model {name!r} is unavailable: {entry.error}", code=InferenceCode.MODEL_UNAVAILABLE)
        return entry.config

    @api("KServe v2 model metadata: its inputs and outputs", response=ModelMetadata, errors=(404,),
         checks="Also `read` on `model:<name>`.", error_model="kserve")
    @requires("inference", "read")
    @kserve_errors
    async def model_metadata(self, request: Request) -> Response:
        cfg = await self._allowed_config(request, "read")
        return JSONResponse(cfg.metadata())

    @api("The model's configuration (Triton's /config)", response=ModelConfig, errors=(404,),
         checks="Also `read` on `model:<name>`.", error_model="kserve")
    @requires("inference", "read")
    @kserve_errors
    async def model_config(self, request: Request) -> Response:
        """The model's xcstack config (Triton's /config endpoint; tritonclient get_model_config)."""
        cfg = await self._allowed_config(request, "read")
        return JSONResponse(cfg.model_dump(mode="json", exclude={"source"}))

    @api("KServe v2 model readiness", response=ModelReady, errors=(404,), also={503: _MODEL_503},
         checks="Also `read` on `model:<name>`.", error_model="kserve",
         description="503 answers `{\"name\", \"ready\": false}` for a model that is not loaded, or the "
                     "KServe error `model_unavailable` for one whose configuration is invalid.")
    @requires("inference", "read")
    @kserve_errors
    async def model_ready(self, request: Request) -> Response:
        cfg = await self._allowed_config(request, "read")
        ok = await self.models.backend.model_ready(cfg.name)
        return JSONResponse({"name": cfg.name, "ready": ok}, status_code=200 if ok else 503)

    @requires("inference", "read")
    @kserve_errors
    async def repository_index(self, request: Request) -> Response:
        index = self.models.repo.index()
        raw = await request.body() if request.method == "POST" else b""
        if raw.strip():  # KServe's optional body {"ready": true}: only the models that are ready
            try:
                data = loads(raw)
            except ValueError as exc:
                raise BadRequest(f"malformed JSON: {exc}", code=CoreCode.INVALID_JSON) from None
            if parse_model(data, RepositoryIndexRequest).ready:
                index = [m for m in index if m["state"] == "READY"]
        return JSONResponse(index)

    # --- inference -------------------------------------------------------------------------------
    @api("KServe v2 inference (JSON or the binary tensor extension)", body=InferRequestJSON,
         raw_body={"application/octet-stream": _BINARY_REQUEST}, response=InferResponseJSON,
         streams={"application/octet-stream": _BINARY_RESPONSE}, errors=(404, 500, 504),
         checks="Also `infer` on `model:<name>`.", description=_INFER_DESCRIPTION, error_model="kserve")
    @requires("inference", "infer")
    @kserve_errors
    async def infer(self, request: Request) -> Response:
        cfg = await self._allowed_config(request, "infer")
        limit = self.models.settings.max_tensor_bytes
        declared = content_length(request)
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the inference limit is {limit}")
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is {len(body)} bytes; the inference limit is {limit}")
        encoding, hlen = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)
        max_chars = self.models.settings.max_input_chars  # the /v1/embeddings limit, for /v2 texts too
        if len(body) > OFFLOAD_BYTES or encoding:
            # validating (finite, ranges) or inflating megabytes would stall the loop: do it in a thread
            req = await asyncio.to_thread(_decode, body, encoding, limit, hlen, cfg, max_chars)
        else:
            req = decode_infer_request(body, hlen, cfg, max_chars)
        timeout = self.models.settings.request_timeout_s
        try:
            if req.texts is not None and len(req.texts) > self.models.settings.max_inputs:
                raise BadRequest(f"input '{cfg.text_input}': {len(req.texts)} texts; the limit is "
                                 f"{self.models.settings.max_inputs}",
                                 code=InferenceCode.TOO_MANY_INPUTS, param=cfg.text_input)
            async with CancelOnDisconnect(request.receive):  # a departed client's rows leave the queue
                if req.texts is not None:
                    vectors, _tokens = await self.models.backend.embed(cfg.name, req.texts, timeout)
                    results = {cfg.outputs[0].name: np.ascontiguousarray(vectors, dtype=np.float32)}
                else:
                    results = await self.models.backend.infer(cfg.name, req.inputs, [n for n, _ in req.outputs],
                                                           timeout)
        except ClientDisconnected:
            metrics.count_departed(cfg.name, "kserve")
            return DepartedResponse()
        except Exception:
            metrics.count_request(cfg.name, "kserve", "error")
            raise
        metrics.count_request(cfg.name, "kserve", "ok")
        await self._turn()
        if sum(a.nbytes for a in results.values()) > OFFLOAD_BYTES:
            payload, headers = await asyncio.to_thread(encode_infer_response, cfg.name, req.id, results, req.outputs)
        else:
            payload, headers = encode_infer_response(cfg.name, req.id, results, req.outputs)
        media = headers.pop("content-type")
        return Response(payload, media_type=media, headers=headers)

    @api("Embeddings from a local model (OpenAI)", body=EmbeddingsRequest, response=EmbeddingsResponse,
         errors=(404, 500, 504), checks="Also `embed` on `model:<name>` (default: the default embedding model).")
    @requires("inference", "embed")
    async def embeddings(self, request: Request) -> Response:
        await self._turn()
        req = await read_model(request, EmbeddingsRequest)
        name = req.model or self.models.settings.default_embedding_model
        await authorize(request, f"model:{name}", "embed")
        try:
            async with CancelOnDisconnect(request.receive):  # a departed client's rows leave the queue
                vectors, usage = await self.models.embed_request(name, req)
        except ClientDisconnected:
            metrics.count_departed(name, "embed")
            return DepartedResponse()
        await self._turn()  # a batch's replies resolve together: spread their encoding and sends
        return JSONResponse(embeddings_response(name, vectors, usage["prompt_tokens"], req.encoding_format))


api_for("GET", InferenceRoutes.repository_index, ApiDoc(
    "KServe v2 repository index: every model and its state", response=RepositoryIndex, error_model="kserve"))
api_for("POST", InferenceRoutes.repository_index, ApiDoc(
    "KServe v2 repository index; `{\"ready\": true}` lists the ready models only", body=RepositoryIndexRequest,
    body_required=False, response=RepositoryIndex, error_model="kserve"))
