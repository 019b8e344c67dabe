"""Wire formats of the inference capability: KServe v2 (+ binary tensor extension) and OpenAI embeddings.

KServe v2 binary extension: the body is a JSON header followed by raw tensor bytes; the header's length
is in `Inference-Header-Content-Length`; each binary input says its size in
`parameters.binary_data_size`, in input order. Tensors are little-endian row-major; BYTES elements are
4-byte length + bytes. Decoding makes no copy of fixed-size tensors (numpy.frombuffer over the body).
Every rejection is a 400 that names the offending tensor (`param`).

JSON `data` is typed strictly, as KServe v2 defines it: BOOL takes JSON booleans, the integer types JSON
integers within the type's range, the float types JSON numbers, BYTES JSON strings. Nothing is coerced
(no `true` for 1, no "12" or "١٢" for 12, no 1.5 truncated to 1, no integer N turned into N zero bytes), and
no tensor may claim more elements than the body has bytes, so a small body never allocates a large one.
"""

from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool
from pydantic.json_schema import SkipJsonSchema

from xcstack.errors import BadRequest, PayloadTooLarge
from xcstack.httputil import dumps, loads
from xcstack.inference.repository import ModelConfig, TensorSpec
from xcstack.inference.settings import MAX_INPUT_CHARS
from xcstack.inference.tensors import DTYPES, datatype_of, element_count, from_buffer, tensor_bytes


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
_ASCII_UINT = re.compile(r"[0-9]{1,19}")  # int() alone would take "١٢", " 12", "+12" and "1_2"
MAX_ID_CHARS = 1024
# The JSON types each datatype accepts (exact types: bool is not an int here).
_JSON_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
    **{dt: frozenset({int}) for dt in DTYPES if dt.startswith(("INT", "UINT"))},
    **{dt: frozenset({int, float}) for dt in ("FP16", "FP32", "FP64")},
}
_JSON_WANTED = {"BOOL": "JSON booleans", "BYTES": "JSON strings", "FP16": "JSON numbers", "FP32": "JSON numbers",
                "FP64": "JSON numbers"}


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, binary?)
    id: str | None
    texts: list[str] | None = None  # text models: the BYTES `text_input` instead of token tensors


def _bad(message: str, code: str, tensor: str | None = None) -> BadRequest:
    return BadRequest(message, code=code, param=tensor)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding gzip/deflate with a bound on the output (413 past `limit`)."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise _bad(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", code="unsupported_encoding")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad(f"body is not valid {encoding}: {exc}", code="invalid_encoding") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes", code="payload_too_large")
    return out


def _header_length(value: str | None, size: int) -> int:
    """Inference-Header-Content-Length: ASCII digits only, within the body."""
    if value is None:
        return size
    if not _ASCII_UINT.fullmatch(value):
        raise _bad(f"Inference-Header-Content-Length {value[:40]!r} is not a decimal integer", code="invalid_header")
    hlen = int(value)
    if hlen > size:
        raise _bad(f"Inference-Header-Content-Length {hlen} is outside the body ({size} bytes)", code="invalid_header")
    return hlen


def decode_infer_request(
    body: bytes, header_length: str | None, cfg: ModelConfig, max_chars: int = MAX_INPUT_CHARS
) -> InferRequest:
    """A KServe v2 request, validated; `max_chars` bounds each text of a text model (as /v1/embeddings)."""
    view = memoryview(body)
    hlen = _header_length(header_length, len(body))
    try:
        header = loads(view[:hlen].tobytes() if hlen != len(body) else body)
    except ValueError as exc:
        raise _bad(f"malformed JSON inference header: {exc}", code="invalid_json") from None
    if not isinstance(header, dict):
        raise _bad("inference header must be a JSON object", code="invalid_json")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list", code="missing_input")
    specs = {t.name: t for t in cfg.inputs}
    text_spec: TensorSpec | None = None
    if cfg.text_input and any(isinstance(r, dict) and r.get("name") == cfg.text_input for r in raw_inputs):
        # a text model's virtual input: BYTES [n] of UTF-8 sentences, tokenized by the model worker
        text_spec = TensorSpec(name=cfg.text_input, datatype="BYTES", shape=[-1])
        specs = {cfg.text_input: text_spec}
    if len(raw_inputs) > len(specs):
        raise _bad(f"{len(raw_inputs)} inputs given; model {cfg.name} takes {len(specs)} ({', '.join(specs)})",
                   code="too_many_inputs")
    binary = view[hlen:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _bad("each input needs a string 'name'", code="invalid_input")
        name = raw["name"]
        spec = specs.get(name)
        if spec is None:
            raise _bad(f"input '{name}' is not an input of model {cfg.name} ({', '.join(specs)})",
                       code="unknown_input", tensor=name)
        if name in inputs:
            raise _bad(f"input '{name}' given twice", code="duplicate_input", tensor=name)
        datatype = raw.get("datatype")
        if datatype != spec.datatype:
            raise _bad(f"input '{name}': datatype {datatype!r}, model expects {spec.datatype}", code="invalid_datatype",
                       tensor=name)
        shape = _check_shape(raw.get("shape"), spec, cfg, name)
        count = element_count(shape)
        if count > len(body):  # every element takes at least one byte of the body, in JSON and in binary
            raise _bad(f"input '{name}': shape {shape} has {count} elements, more than the body's {len(body)} bytes"
                       " can hold", code="invalid_tensor_size", tensor=name)
        size = _parameters(raw.get("parameters"), name).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise _bad(f"input '{name}': binary_data_size must be a non-negative integer",
                           code="invalid_tensor_size", tensor=name)
            if offset + size > binary.nbytes:
                raise _bad(f"input '{name}': binary_data_size {size} runs past the end of the body "
                           f"({binary.nbytes - offset} bytes left)", code="invalid_tensor_size", tensor=name)
            arr = from_buffer(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in raw:
            arr = _from_json(raw["data"], datatype, shape, count, name)
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size",
                       code="missing_data", tensor=name)
        _check_values(arr, spec, name)
        inputs[name] = arr
    if offset != binary.nbytes:
        raise _bad(f"{binary.nbytes - offset} bytes of binary data follow the last input", code="invalid_tensor_size")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise _bad(f"missing input(s) {', '.join(repr(m) for m in missing)} for model {cfg.name}",
                   code="missing_input", tensor=missing[0])
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) > 1:
        raise _bad(f"inputs disagree on the batch dimension: {sorted(rows)}", code="invalid_shape")
    rid = header.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID_CHARS):
        raise _bad(f"'id' must be a string of at most {MAX_ID_CHARS} characters", code="invalid_parameter")
    if text_spec is not None:
        return InferRequest({}, _outputs(header, cfg), rid, _texts(inputs[text_spec.name], text_spec.name, max_chars))
    return InferRequest(inputs, _outputs(header, cfg), rid)


def _check_shape(shape: Any, spec: TensorSpec, cfg: ModelConfig, name: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input '{name}': shape must be a list of integers", code="invalid_shape", tensor=name)
    if len(shape) != len(spec.shape):
        raise _bad(f"input '{name}': shape {shape} has {len(shape)} dims, model expects {spec.shape}",
                   code="invalid_shape", tensor=name)
    for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got <= 0:
            raise _bad(f"input '{name}': dim {i} is {got}; dims must be positive", code="invalid_shape", tensor=name)
        if want != -1 and got != want:
            raise _bad(f"input '{name}': shape {shape} does not match {spec.shape} at dim {i}",
                       code="invalid_shape", tensor=name)
        if spec.max_shape is not None and spec.max_shape[i] != -1 and got > spec.max_shape[i]:
            raise _bad(f"input '{name}': dim {i} is {got}; the limit is {spec.max_shape[i]}",
                       code="invalid_shape", tensor=name)
    if shape[0] > cfg.max_batch_size:
        raise _bad(f"input '{name}': batch of {shape[0]} exceeds max_batch_size {cfg.max_batch_size}",
                   code="batch_too_large", tensor=name)
    return shape


def _texts(arr: np.ndarray, name: str, max_chars: int) -> list[str]:
    """A text input's elements as str, each within `max_chars` (checked before any decoding work)."""
    texts: list[str] = []
    for i, b in enumerate(arr.reshape(-1)):
        if len(b) > 4 * max_chars:  # UTF-8 takes at most 4 bytes a character: too long whatever it holds
            raise _too_long(name, i, f"{len(b)} bytes", max_chars)
        try:
            t = b.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"input '{name}': elements must be UTF-8 text", code="invalid_data", tensor=name) from None
        if len(t) > max_chars:
            raise _too_long(name, i, f"{len(t)} characters", max_chars)
        texts.append(t)
    return texts


def _too_long(name: str, index: int, size: str, max_chars: int) -> BadRequest:
    return _bad(f"input '{name}'[{index}]: {size}; the limit is {max_chars} characters",
                code="input_too_long", tensor=name)


def _flat_json(data: Any, shape: list[int], count: int, name: str) -> list[Any]:
    """`data` flat (row-major) or nested exactly as `shape`; the walk never outgrows `count`."""
    if not isinstance(data, list):
        raise _bad(f"input '{name}': 'data' must be a JSON array", code="invalid_data", tensor=name)
    if not data or not isinstance(data[0], list):  # flat; a list among the values fails the type check
        if len(data) != count:
            raise _bad(f"input '{name}': {len(data)} values for shape {shape} ({count} expected)",
                       code="invalid_tensor_size", tensor=name)
        return data
    items: list[Any] = [data]
    for dim in shape:
        nxt: list[Any] = []
        for it in items:
            if not isinstance(it, list) or len(it) != dim:
                raise _bad(f"input '{name}': nested 'data' does not have shape {shape}",
                           code="invalid_tensor_size", tensor=name)
            nxt.extend(it)
        items = nxt
    return items


def _from_json(data: Any, datatype: str, shape: list[int], count: int, name: str) -> np.ndarray:
    flat = _flat_json(data, shape, count, name)
    allowed = _JSON_TYPES[datatype]
    if not set(map(type, flat)) <= allowed:
        bad = next(v for v in flat if type(v) not in allowed)
        got = f"{type(bad).__name__} {bad!r}" if isinstance(bad, (int, float)) else type(bad).__name__
        raise _bad(f"input '{name}': {datatype} data must be {_JSON_WANTED.get(datatype, 'JSON integers')}; "
                   f"got {got}", code="invalid_data", tensor=name)
    dtype = DTYPES[datatype]
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        try:
            for i, v in enumerate(flat):
                arr[i] = v.encode()
        except UnicodeEncodeError:  # lone surrogates (a JSON parser that lets them through)
            raise _bad(f"input '{name}': element {i} is not valid Unicode text",
                       code="invalid_data", tensor=name) from None
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            raise _bad(f"input '{name}': {datatype} values must be within [{info.min}, {info.max}] (got {lo}..{hi})",
                       code="value_out_of_range", tensor=name)
        arr = np.array(flat, dtype=dtype)
    elif dtype.kind == "f":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # an integer past float64's range
            raise _bad(f"input '{name}': a value is outside the range of {datatype}", code="value_out_of_range",
                       tensor=name) from None
        with np.errstate(over="ignore"):
            arr = wide.astype(dtype)
        if np.isinf(arr).sum() != np.isinf(wide).sum():  # a finite value that the narrower type cannot hold
            raise _bad(f"input '{name}': a value is outside the range of {datatype}",
                       code="value_out_of_range", tensor=name)
    else:
        arr = np.array(flat, dtype=dtype)
    return arr.reshape(shape)


def _check_values(arr: np.ndarray, spec: TensorSpec, name: str) -> None:
    if arr.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(arr).all():
        raise _bad(f"input '{name}' contains NaN or Inf", code="non_finite_value", tensor=name)
    if spec.value_range is not None and arr.dtype.kind in "iuf" and arr.size:
        lo, hi = spec.value_range
        amin, amax = arr.min(), arr.max()
        if amin < lo or amax > hi:
            raise _bad(f"input '{name}': values must be within [{lo:g}, {hi:g}] (got {amin}..{amax})",
                       code="value_out_of_range", tensor=name)


def _outputs(header: dict[str, Any], cfg: ModelConfig) -> list[tuple[str, bool]]:
    default_binary = _flag(_parameters(header.get("parameters"), None), "binary_data_output", False, None)
    known = [t.name for t in cfg.outputs]
    raw = header.get("outputs")
    if raw is None:
        return [(n, default_binary) for n in known]
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list", code="invalid_output")
    out: list[tuple[str, bool]] = []
    for o in raw:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in known:
            raise _bad(f"output {name!r} is not an output of model {cfg.name} ({', '.join(known)})",
                       code="unknown_output", tensor=str(name)[:128])
        if any(n == name for n, _ in out):  # each repeat would copy the whole tensor into the response again
            raise _bad(f"output '{name}' requested twice", code="duplicate_output", tensor=name)
        out.append((name, _flag(_parameters(o.get("parameters"), name), "binary_data", default_binary, name)))
    return out


def _parameters(value: Any, tensor: str | None) -> dict[str, Any]:
    """A `parameters` member: a JSON object, or absent/null for none (its documented schema says so)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("'parameters' must be a JSON object", code="invalid_parameter", tensor=tensor)
    return value


def _flag(params: dict[str, Any], key: str, default: bool, tensor: str | None) -> bool:
    """A boolean parameter: JSON true/false only (bool("false") would be True)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"parameter {key!r} must be true or false", code="invalid_parameter", tensor=tensor)
    return value


def encode_infer_response(
    model: str, request_id: str | None, results: dict[str, np.ndarray], outputs: list[tuple[str, bool]]
) -> tuple[bytes, dict[str, str]]:
    """The KServe v2 response body (JSON header + binary outputs) and its headers."""
    descs: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, binary in outputs:
        arr = results[name]
        d: dict[str, Any] = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary:
            raw = tensor_bytes(arr)
            d["parameters"] = {"binary_data_size": memoryview(raw).nbytes}
            chunks.append(raw)
        elif d["datatype"] == "BYTES":
            d["data"] = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
        else:
            d["data"] = arr.reshape(-1)
        descs.append(d)
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": descs}
    if request_id is not None:
        head["id"] = request_id
    header = dumps(head)
    if not chunks:
        return header, {"content-type": "application/json"}
    body = b"".join([header, *chunks])
    return body, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}


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
        raise BadRequest("input: must not be empty", code="invalid_parameter", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("input: token-id arrays are not supported by local models; send text",
                         code="unsupported_input", param="input")
    if len(texts) > max_inputs:
        raise BadRequest(f"input: {len(texts)} items; the limit is {max_inputs}", code="too_many_inputs",
                         param="input")
    for i, t in enumerate(texts):
        if len(t) > max_chars:  # type: ignore[arg-type]
            raise BadRequest(f"input[{i}]: {len(t)} characters; the limit is {max_chars}",  # type: ignore[arg-type]
                             code="input_too_long", param=f"input[{i}]")
    return texts  # type: ignore[return-value]


def embeddings_response(model: str, vectors: np.ndarray, tokens: int, encoding_format: str) -> dict[str, Any]:
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
