"""Wire formats of the inference capability: KServe v2 (+ binary tensor extension) and OpenAI embeddings.

KServe v2 binary extension: the body is a JSON header followed by raw tensor bytes; the header's length
is in `Inference-Header-Content-Length`; each binary input says its size in
`parameters.binary_data_size`, in input order. Tensors are little-endian row-major; BYTES elements are
4-byte length + bytes. Decoding makes no copy of fixed-size tensors (numpy.frombuffer over the body).
Every rejection is a 400 that names the offending tensor (`param`).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xcstack.errors import BadRequest, PayloadTooLarge
from xcstack.httputil import dumps, loads
from xcstack.inference.repository import ModelConfig, TensorSpec
from xcstack.inference.tensors import DTYPES, datatype_of, element_count, from_buffer, tensor_bytes

HEADER_LENGTH = "inference-header-content-length"


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
        raise _bad(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", "unsupported_encoding")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad(f"body is not valid {encoding}: {exc}", "invalid_encoding") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes", code="payload_too_large")
    return out


def decode_infer_request(body: bytes, header_length: str | None, cfg: ModelConfig) -> InferRequest:
    view = memoryview(body)
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length is not an integer", "invalid_header") from None
        if hlen < 0 or hlen > len(body):
            raise _bad(f"Inference-Header-Content-Length {hlen} is outside the body ({len(body)} bytes)",
                       "invalid_header")
    else:
        hlen = len(body)
    try:
        header = loads(view[:hlen].tobytes() if hlen != len(body) else body)
    except ValueError as exc:
        raise _bad(f"malformed JSON inference header: {exc}", "invalid_json") from None
    if not isinstance(header, dict):
        raise _bad("inference header must be a JSON object", "invalid_json")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list", "missing_input")
    specs = {t.name: t for t in cfg.inputs}
    text_spec: TensorSpec | None = None
    if cfg.text_input and any(isinstance(r, dict) and r.get("name") == cfg.text_input for r in raw_inputs):
        # a text model's virtual input: BYTES [n] of UTF-8 sentences, tokenized by the model worker
        text_spec = TensorSpec(name=cfg.text_input, datatype="BYTES", shape=[-1])
        specs = {cfg.text_input: text_spec}
    if len(raw_inputs) > len(specs):
        raise _bad(f"{len(raw_inputs)} inputs given; model {cfg.name} takes {len(specs)} ({', '.join(specs)})",
                   "too_many_inputs")
    binary = view[hlen:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _bad("each input needs a string 'name'", "invalid_input")
        name = raw["name"]
        spec = specs.get(name)
        if spec is None:
            raise _bad(f"input '{name}' is not an input of model {cfg.name} ({', '.join(specs)})",
                       "unknown_input", name)
        if name in inputs:
            raise _bad(f"input '{name}' given twice", "duplicate_input", name)
        datatype = raw.get("datatype")
        if datatype != spec.datatype:
            raise _bad(f"input '{name}': datatype {datatype!r}, model expects {spec.datatype}", "invalid_datatype",
                       name)
        shape = _check_shape(raw.get("shape"), spec, cfg, name)
        params = raw.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise _bad(f"input '{name}': binary_data_size must be a non-negative integer", "invalid_tensor_size",
                           name)
            if offset + size > binary.nbytes:
                raise _bad(f"input '{name}': binary_data_size {size} runs past the end of the body "
                           f"({binary.nbytes - offset} bytes left)", "invalid_tensor_size", name)
            arr = from_buffer(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in raw:
            arr = _from_json(raw["data"], datatype, shape, name)
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size", "missing_data", name)
        _check_values(arr, spec, name)
        inputs[name] = arr
    if offset != binary.nbytes:
        raise _bad(f"{binary.nbytes - offset} bytes of binary data follow the last input", "invalid_tensor_size")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise _bad(f"missing input(s) {', '.join(repr(m) for m in missing)} for model {cfg.name}",
                   "missing_input", missing[0])
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) > 1:
        raise _bad(f"inputs disagree on the batch dimension: {sorted(rows)}", "invalid_shape")
    rid = str(header["id"]) if "id" in header else None
    if text_spec is not None:
        name = text_spec.name
        try:
            texts = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in inputs[name].reshape(-1)]
        except UnicodeDecodeError:
            raise _bad(f"input '{name}': elements must be UTF-8 text", "invalid_data", name) from None
        return InferRequest({}, _outputs(header, cfg), rid, texts)
    return InferRequest(inputs, _outputs(header, cfg), rid)


def _check_shape(shape: Any, spec: TensorSpec, cfg: ModelConfig, name: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input '{name}': shape must be a list of integers", "invalid_shape", name)
    if len(shape) != len(spec.shape):
        raise _bad(f"input '{name}': shape {shape} has {len(shape)} dims, model expects {spec.shape}",
                   "invalid_shape", name)
    for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got <= 0:
            raise _bad(f"input '{name}': dim {i} is {got}; dims must be positive", "invalid_shape", name)
        if want != -1 and got != want:
            raise _bad(f"input '{name}': shape {shape} does not match {spec.shape} at dim {i}", "invalid_shape", name)
        if spec.max_shape is not None and spec.max_shape[i] != -1 and got > spec.max_shape[i]:
            raise _bad(f"input '{name}': dim {i} is {got}; the limit is {spec.max_shape[i]}", "invalid_shape", name)
    if shape[0] > cfg.max_batch_size:
        raise _bad(f"input '{name}': batch of {shape[0]} exceeds max_batch_size {cfg.max_batch_size}",
                   "batch_too_large", name)
    return shape


def _from_json(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    count = element_count(shape)
    try:
        if datatype == "BYTES":
            flat = np.array(
                [d.encode() if isinstance(d, str) else bytes(d) for d in np.asarray(data, dtype=object).reshape(-1)],
                dtype=object,
            )
        else:
            flat = np.asarray(data, dtype=DTYPES[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"input '{name}': data is not {datatype}: {exc}", "invalid_data", name) from None
    if flat.size != count:
        raise _bad(f"input '{name}': {flat.size} values for shape {shape} ({count} expected)", "invalid_tensor_size",
                   name)
    return flat.reshape(shape)


def _check_values(arr: np.ndarray, spec: TensorSpec, name: str) -> None:
    if arr.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(arr).all():
        raise _bad(f"input '{name}' contains NaN or Inf", "non_finite_value", name)
    if spec.value_range is not None and arr.dtype.kind in "iuf" and arr.size:
        lo, hi = spec.value_range
        amin, amax = arr.min(), arr.max()
        if amin < lo or amax > hi:
            raise _bad(f"input '{name}': values must be within [{lo:g}, {hi:g}] (got {amin}..{amax})",
                       "value_out_of_range", name)


def _outputs(header: dict[str, Any], cfg: ModelConfig) -> list[tuple[str, bool]]:
    params = header.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    known = [t.name for t in cfg.outputs]
    raw = header.get("outputs")
    if raw is None:
        return [(n, default_binary) for n in known]
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list", "invalid_output")
    out: list[tuple[str, bool]] = []
    for o in raw:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in known:
            raise _bad(f"output {name!r} is not an output of model {cfg.name} ({', '.join(known)})",
                       "unknown_output", str(name))
        p = o.get("parameters") or {}
        out.append((name, bool(p.get("binary_data", default_binary)) if isinstance(p, dict) else default_binary))
    return out


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


# --- OpenAI embeddings ---------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = Field(None, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


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
