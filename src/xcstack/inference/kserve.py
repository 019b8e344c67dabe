"""The KServe v2 codec: decoding `/v2/models/{name}/infer` bodies (JSON and the binary tensor extension)
against a model's config, and encoding its answers.

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

import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcstack.errors import BadRequest, CoreCode, PayloadTooLarge
from xcstack.httputil import dumps, loads
from xcstack.inference.protocol import MAX_ID_CHARS, InferenceCode
from xcstack.inference.repository import ModelConfig, TensorSpec
from xcstack.inference.settings import MAX_INPUT_CHARS
from xcstack.inference.tensors import DTYPES, datatype_of, element_count, from_buffer, tensor_bytes

_ASCII_UINT = re.compile(r"[0-9]{1,19}")  # int() alone would take "١٢", " 12", "+12" and "1_2"
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
        raise _bad(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)",
                   code=InferenceCode.UNSUPPORTED_ENCODING)
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad(f"body is not valid {encoding}: {exc}", code=InferenceCode.INVALID_ENCODING) from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes", code=CoreCode.PAYLOAD_TOO_LARGE)
    return out


def _header_length(value: str | None, size: int) -> int:
    """Inference-Header-Content-Length: ASCII digits only, within the body."""
    if value is None:
        return size
    if not _ASCII_UINT.fullmatch(value):
        raise _bad(f"Inference-Header-Content-Length {value[:40]!r} is not a decimal integer",
                   code=InferenceCode.INVALID_HEADER)
    hlen = int(value)
    if hlen > size:
        raise _bad(f"Inference-Header-Content-Length {hlen} is outside the body ({size} bytes)",
                   code=InferenceCode.INVALID_HEADER)
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
        raise _bad(f"malformed JSON inference header: {exc}", code=CoreCode.INVALID_JSON) from None
    if not isinstance(header, dict):
        raise _bad("inference header must be a JSON object", code=CoreCode.INVALID_JSON)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list", code=InferenceCode.MISSING_INPUT)
    specs = {t.name: t for t in cfg.inputs}
    text_spec: TensorSpec | None = None
    if cfg.text_input and any(isinstance(r, dict) and r.get("name") == cfg.text_input for r in raw_inputs):
        # a text model's virtual input: BYTES [n] of UTF-8 sentences, tokenized by the model worker
        text_spec = TensorSpec(name=cfg.text_input, datatype="BYTES", shape=[-1])
        specs = {cfg.text_input: text_spec}
    if len(raw_inputs) > len(specs):
        raise _bad(f"{len(raw_inputs)} inputs given; model {cfg.name} takes {len(specs)} ({', '.join(specs)})",
                   code=InferenceCode.TOO_MANY_INPUTS)
    binary = view[hlen:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _bad("each input needs a string 'name'", code=InferenceCode.INVALID_INPUT)
        name = raw["name"]
        spec = specs.get(name)
        if spec is None:
            raise _bad(f"input '{name}' is not an input of model {cfg.name} ({', '.join(specs)})",
                       code=InferenceCode.UNKNOWN_INPUT, tensor=name)
        if name in inputs:
            raise _bad(f"input '{name}' given twice", code=InferenceCode.DUPLICATE_INPUT, tensor=name)
        datatype = raw.get("datatype")
        if datatype != spec.datatype:
            raise _bad(f"input '{name}': datatype {datatype!r}, model expects {spec.datatype}",
                       code=InferenceCode.INVALID_DATATYPE,
                       tensor=name)
        shape = _check_shape(raw.get("shape"), spec, cfg, name)
        count = element_count(shape)
        if count > len(body):  # every element takes at least one byte of the body, in JSON and in binary
            raise _bad(f"input '{name}': shape {shape} has {count} elements, more than the body's {len(body)} bytes"
                       " can hold", code=InferenceCode.INVALID_TENSOR_SIZE, tensor=name)
        size = _parameters(raw.get("parameters"), name).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise _bad(f"input '{name}': binary_data_size must be a non-negative integer",
                           code=InferenceCode.INVALID_TENSOR_SIZE, tensor=name)
            if offset + size > binary.nbytes:
                raise _bad(f"input '{name}': binary_data_size {size} runs past the end of the body "
                           f"({binary.nbytes - offset} bytes left)",
                           code=InferenceCode.INVALID_TENSOR_SIZE, tensor=name)
            arr = from_buffer(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in raw:
            arr = _from_json(raw["data"], datatype, shape, count, name)
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size",
                       code=InferenceCode.MISSING_DATA, tensor=name)
        _check_values(arr, spec, name)
        inputs[name] = arr
    if offset != binary.nbytes:
        raise _bad(f"{binary.nbytes - offset} bytes of binary data follow the last input",
                   code=InferenceCode.INVALID_TENSOR_SIZE)
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise _bad(f"missing input(s) {', '.join(repr(m) for m in missing)} for model {cfg.name}",
                   code=InferenceCode.MISSING_INPUT, tensor=missing[0])
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) > 1:
        raise _bad(f"inputs disagree on the batch dimension: {sorted(rows)}", code=InferenceCode.INVALID_SHAPE)
    rid = header.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID_CHARS):
        raise _bad(f"'id' must be a string of at most {MAX_ID_CHARS} characters", code=CoreCode.INVALID_PARAMETER)
    if text_spec is not None:
        return InferRequest({}, _outputs(header, cfg), rid, _texts(inputs[text_spec.name], text_spec.name, max_chars))
    return InferRequest(inputs, _outputs(header, cfg), rid)


def _check_shape(shape: Any, spec: TensorSpec, cfg: ModelConfig, name: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input '{name}': shape must be a list of integers", code=InferenceCode.INVALID_SHAPE, tensor=name)
    if len(shape) != len(spec.shape):
        raise _bad(f"input '{name}': shape {shape} has {len(shape)} dims, model expects {spec.shape}",
                   code=InferenceCode.INVALID_SHAPE, tensor=name)
    for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got <= 0:
            raise _bad(f"input '{name}': dim {i} is {got}; dims must be positive",
                       code=InferenceCode.INVALID_SHAPE, tensor=name)
        if want != -1 and got != want:
            raise _bad(f"input '{name}': shape {shape} does not match {spec.shape} at dim {i}",
                       code=InferenceCode.INVALID_SHAPE, tensor=name)
        if spec.max_shape is not None and spec.max_shape[i] != -1 and got > spec.max_shape[i]:
            raise _bad(f"input '{name}': dim {i} is {got}; the limit is {spec.max_shape[i]}",
                       code=InferenceCode.INVALID_SHAPE, tensor=name)
    if shape[0] > cfg.max_batch_size:
        raise _bad(f"input '{name}': batch of {shape[0]} exceeds max_batch_size {cfg.max_batch_size}",
                   code=CoreCode.BATCH_TOO_LARGE, tensor=name)
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
            raise _bad(f"input '{name}': elements must be UTF-8 text",
                       code=InferenceCode.INVALID_DATA, tensor=name) from None
        if len(t) > max_chars:
            raise _too_long(name, i, f"{len(t)} characters", max_chars)
        texts.append(t)
    return texts


def _too_long(name: str, index: int, size: str, max_chars: int) -> BadRequest:
    return _bad(f"input '{name}'[{index}]: {size}; the limit is {max_chars} characters",
                code=InferenceCode.INPUT_TOO_LONG, tensor=name)


def _flat_json(data: Any, shape: list[int], count: int, name: str) -> list[Any]:
    """`data` flat (row-major) or nested exactly as `shape`; the walk never outgrows `count`."""
    if not isinstance(data, list):
        raise _bad(f"input '{name}': 'data' must be a JSON array", code=InferenceCode.INVALID_DATA, tensor=name)
    if not data or not isinstance(data[0], list):  # flat; a list among the values fails the type check
        if len(data) != count:
            raise _bad(f"input '{name}': {len(data)} values for shape {shape} ({count} expected)",
                       code=InferenceCode.INVALID_TENSOR_SIZE, tensor=name)
        return data
    items: list[Any] = [data]
    for dim in shape:
        nxt: list[Any] = []
        for it in items:
            if not isinstance(it, list) or len(it) != dim:
                raise _bad(f"input '{name}': nested 'data' does not have shape {shape}",
                           code=InferenceCode.INVALID_TENSOR_SIZE, tensor=name)
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
                   f"got {got}", code=InferenceCode.INVALID_DATA, tensor=name)
    dtype = DTYPES[datatype]
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        try:
            for i, v in enumerate(flat):
                arr[i] = v.encode()
        except UnicodeEncodeError:  # lone surrogates (a JSON parser that lets them through)
            raise _bad(f"input '{name}': element {i} is not valid Unicode text",
                       code=InferenceCode.INVALID_DATA, tensor=name) from None
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            raise _bad(f"input '{name}': {datatype} values must be within [{info.min}, {info.max}] (got {lo}..{hi})",
                       code=InferenceCode.VALUE_OUT_OF_RANGE, tensor=name)
        arr = np.array(flat, dtype=dtype)
    elif dtype.kind == "f":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # an integer past float64's range
            raise _bad(f"input '{name}': a value is outside the range of {datatype}",
                       code=InferenceCode.VALUE_OUT_OF_RANGE,
                       tensor=name) from None
        with np.errstate(over="ignore"):
            arr = wide.astype(dtype)
        if np.isinf(arr).sum() != np.isinf(wide).sum():  # a finite value that the narrower type cannot hold
            raise _bad(f"input '{name}': a value is outside the range of {datatype}",
                       code=InferenceCode.VALUE_OUT_OF_RANGE, tensor=name)
    else:
        arr = np.array(flat, dtype=dtype)
    return arr.reshape(shape)


def _check_values(arr: np.ndarray, spec: TensorSpec, name: str) -> None:
    if arr.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(arr).all():
        raise _bad(f"input '{name}' contains NaN or Inf", code=InferenceCode.NON_FINITE_VALUE, tensor=name)
    if spec.value_range is not None and arr.dtype.kind in "iuf" and arr.size:
        lo, hi = spec.value_range
        amin, amax = arr.min(), arr.max()
        if amin < lo or amax > hi:
            raise _bad(f"input '{name}': values must be within [{lo:g}, {hi:g}] (got {amin}..{amax})",
                       code=InferenceCode.VALUE_OUT_OF_RANGE, tensor=name)


def _outputs(header: dict[str, Any], cfg: ModelConfig) -> list[tuple[str, bool]]:
    default_binary = _flag(_parameters(header.get("parameters"), None), "binary_data_output", False, None)
    known = [t.name for t in cfg.outputs]
    raw = header.get("outputs")
    if raw is None:
        return [(n, default_binary) for n in known]
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list", code=InferenceCode.INVALID_OUTPUT)
    out: list[tuple[str, bool]] = []
    for o in raw:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in known:
            raise _bad(f"output {name!r} is not an output of model {cfg.name} ({', '.join(known)})",
                       code=InferenceCode.UNKNOWN_OUTPUT, tensor=str(name)[:128])
        if any(n == name for n, _ in out):  # each repeat would copy the whole tensor into the response again
            raise _bad(f"output '{name}' requested twice", code=InferenceCode.DUPLICATE_OUTPUT, tensor=name)
        out.append((name, _flag(_parameters(o.get("parameters"), name), "binary_data", default_binary, name)))
    return out


def _parameters(value: Any, tensor: str | None) -> dict[str, Any]:
    """A `parameters` member: a JSON object, or absent/null for none (its documented schema says so)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("'parameters' must be a JSON object", code=CoreCode.INVALID_PARAMETER, tensor=tensor)
    return value


def _flag(params: dict[str, Any], key: str, default: bool, tensor: str | None) -> bool:
    """A boolean parameter: JSON true/false only (bool("false") would be True)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"parameter {key!r} must be true or false", code=CoreCode.INVALID_PARAMETER, tensor=tensor)
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
