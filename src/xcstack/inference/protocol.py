"""Wire formats of the inference capability: its error codes, the KServe v2 JSON forms (for the API
contract; `kserve.py` decodes and encodes the bodies) and OpenAI embeddings."""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool
from pydantic.json_schema import SkipJsonSchema

from xcstack.errors import BadRequest, CoreCode

if TYPE_CHECKING:
    import numpy as np


class InferenceCode(StrEnum):
    """Stable error codes of the inference capability (docs/inference.md, Errors)."""

    UNSUPPORTED_ENCODING = "unsupported_encoding"
    INVALID_ENCODING = "invalid_encoding"
    INVALID_HEADER = "invalid_header"
    MISSING_INPUT = "missing_input"
    TOO_MANY_INPUTS = "too_many_inputs"
    INVALID_INPUT = "invalid_input"
    UNKNOWN_INPUT = "unknown_input"
    DUPLICATE_INPUT = "duplicate_input"
    INVALID_DATATYPE = "invalid_datatype"
    INVALID_TENSOR_SIZE = "invalid_tensor_size"
    MISSING_DATA = "missing_data"
    INVALID_SHAPE = "invalid_shape"
    INVALID_DATA = "invalid_data"
    INPUT_TOO_LONG = "input_too_long"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    NON_FINITE_VALUE = "non_finite_value"
    INVALID_OUTPUT = "invalid_output"
    UNKNOWN_OUTPUT = "unknown_output"
    DUPLICATE_OUTPUT = "duplicate_output"
    UNSUPPORTED_INPUT = "unsupported_input"
    NOT_AN_EMBEDDING_MODEL = "not_an_embedding_model"
    NOT_A_RERANK_MODEL = "not_a_rerank_model"
    REQUEST_TOO_LARGE = "request_too_large"
    MODEL_UNAVAILABLE = "model_unavailable"
    QUEUE_FULL = "queue_full"
    WORKER_STOPPING = "worker_stopping"
    WORKER_BUSY = "worker_busy"
    MODEL_WORKER_UNAVAILABLE = "model_worker_unavailable"
    INFERENCE_TIMEOUT = "inference_timeout"
    INFERENCE_FAILED = "inference_failed"
    INFERENCE_UNAVAILABLE = "inference_unavailable"


HEADER_LENGTH = "inference-header-content-length"
MAX_ID_CHARS = 1024
# --- the KServe v2 JSON forms, for the API contract ------------------------------------------------
# `decode_infer_request` is the validator of /v2 infer (it needs the model's config and reads binary
# tensors in place); these models describe, for the OpenAPI document, exactly what it accepts: a
# member that may be absent is optional, one that may be null says so, and extra members are ignored.
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]
#: a JSON `data` element (BOOL: booleans, integer types: integers, FP*: numbers, BYTES: strings) or a nested row
TensorValue = bool | int | float | str | list[Any]


def _absent(description: str | None = None) -> Any:
    """An optional member that is left out rather than sent as null (no `default: null` in its schema)."""
    return Field(None, description=description, json_schema_extra=lambda schema: schema.pop("default", None))


class InferInputParameters(BaseModel):
    binary_data_size: int | None = Field(
        None, ge=0, description="binary tensor extension: this input's bytes after the JSON header, in input order")


class InferInputTensor(BaseModel):
    name: str = Field(description="an input of the model (or a text model's `text_input`: BYTES [n] texts)")
    datatype: Datatype = Field(description="must be the model's datatype for this input")
    shape: list[Annotated[int, Field(ge=1)]] = Field(description="dims as the model declares; dim 0 is the batch")
    data: list[TensorValue] | SkipJsonSchema[None] = _absent(
        "the elements, flat (row-major) or nested as `shape`; typed strictly by `datatype`, nothing coerced. "
        "Absent when `parameters.binary_data_size` is given")
    parameters: InferInputParameters | None = None


class InferOutputParameters(BaseModel):
    binary_data: StrictBool | SkipJsonSchema[None] = _absent("answer this output as raw bytes after the JSON header")


class InferRequestedOutput(BaseModel):
    name: str = Field(description="an output of the model")
    parameters: InferOutputParameters | None = None


class InferParameters(BaseModel):
    binary_data_output: StrictBool | SkipJsonSchema[None] = _absent(
        "the default of every output's `binary_data` (false: JSON `data`)")


class InferRequestJSON(BaseModel):
    """KServe v2 inference request (the JSON header of the binary tensor extension has the same form)."""

    id: str | None = Field(None, max_length=MAX_ID_CHARS, description="echoed in the response")
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, description="default: every output of the model")
    parameters: InferParameters | None = None


class InferOutputTensorParameters(BaseModel):
    binary_data_size: int = Field(description="this output's bytes after the JSON header, in output order")


class InferOutputTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]
    data: list[bool | int | float | str | None] | SkipJsonSchema[None] = _absent(
        "the elements, flat (row-major); a NaN is null. Absent for a binary output")
    parameters: InferOutputTensorParameters | SkipJsonSchema[None] = _absent("for a binary output")


class InferResponseJSON(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | SkipJsonSchema[None] = _absent("the request's `id`, when it had one")
    outputs: list[InferOutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1: any size")


class ModelMetadataParameters(BaseModel):
    text_input: str = Field(description="a BYTES [-1] input of texts, accepted instead of the token inputs")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelMetadataParameters | SkipJsonSchema[None] = _absent("text models only")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ReadyProbe(BaseModel):
    ready: bool
    detail: str | SkipJsonSchema[None] = _absent("only for an authenticated caller")


class ModelReady(BaseModel):
    name: str
    ready: bool


class RepositoryIndexRequest(BaseModel):
    """Body of `POST /v2/repository/index` (optional)."""

    ready: StrictBool = Field(False, description="true: only the models that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = Field(description="why the model is unavailable; empty when ready")


class RepositoryIndex(RootModel[list[RepositoryModel]]):
    """The models of the repository, valid or not."""


# --- OpenAI embeddings ---------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    """OpenAI embeddings request. Strict: a JSON type is never coerced (`"5"` or `true` is no dimension)."""

    model_config = ConfigDict(extra="allow", strict=True)

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text or a list of texts (token-id arrays are OpenAI's form; local models refuse them)")
    model: str | None = Field(None, max_length=256, description="default: the configured default embedding model")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="must be the model's own dimensions if given")
    user: str | None = Field(None, max_length=256)
    input_type: Literal["query", "document", "passage"] | None = Field(
        None, description="the model's prefix for this kind of text (e5: `query: ` / `passage: `; `passage` is an"
        " alias of `document`); absent: the model's default_input_type (GET /v2/models/{name}/config)")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (`base64`)")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI embeddings response (what `embeddings_response` builds)."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


def texts_of(req: EmbeddingsRequest, max_inputs: int, max_chars: int) -> list[str]:
    raw = req.input
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise BadRequest("input: must not be empty", code=CoreCode.INVALID_PARAMETER, param="input")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("input: token-id arrays are not supported by local models; send text",
                         code=InferenceCode.UNSUPPORTED_INPUT, param="input")
    if len(texts) > max_inputs:
        raise BadRequest(f"input: {len(texts)} items; the limit is {max_inputs}", code=InferenceCode.TOO_MANY_INPUTS,
                         param="input")
    for i, t in enumerate(texts):
        if len(t) > max_chars:  # type: ignore[arg-type]
            raise BadRequest(f"input[{i}]: {len(t)} characters; the limit is {max_chars}",  # type: ignore[arg-type]
                             code=InferenceCode.INPUT_TOO_LONG, param=f"input[{i}]")
    return texts  # type: ignore[return-value]


def embeddings_response(model: str, vectors: np.ndarray, tokens: int, encoding_format: str) -> dict[str, Any]:
    import numpy as np  # here: the catalogue (openapi.py) imports this module in workers that load no numpy

    data: list[dict[str, Any]] = []
    vecs = np.ascontiguousarray(vectors, dtype="<f4")
    for i in range(vecs.shape[0]):
        emb: Any = base64.b64encode(vecs[i].tobytes()).decode() if encoding_format == "base64" else vecs[i]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
