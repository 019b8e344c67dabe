"""ONNX Runtime sessions for one model worker, device buffers with deterministic release, the tokenizer.

Sessions follow the one-thread-per-pinned-process shape: intra_op=1, inter_op=1, sequential execution,
spinning off (measured here: 2-thread ORT on 2 cores was usually slower than one thread per process).
Every run binds its inputs and outputs through IOBinding with OrtValues owned by a `DeviceBuffers`
scope: leaving the scope drops them at once (no reliance on the garbage collector) and the
live-device-bytes gauge returns to its baseline.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from xcstack.inference.repository import ModelEntry
from xcstack.inference.tensors import DTYPES, ONNX_TO_DATATYPE
from xcstack.observability.metrics import Children

log = logging.getLogger("xcstack.inference")

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}
_ORT_DEVICE = {"cpu": "cpu", "cuda": "cuda", "cann": "cann"}


class ModelLoadError(Exception):
    pass


class DeviceMemoryLedger:
    """Live bytes held in OrtValues, per device ("cpu:0", "cuda:1"); exported as a gauge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def add(self, device: str, n: int) -> None:
        with self._lock:
            v = self._live.get(device, 0) + n
            self._live[device] = v
            if v > self.peak.get(device, 0):
                self.peak[device] = v
        _gauge_set(device, v)

    def live(self, device: str | None = None) -> int:
        with self._lock:
            if device is not None:
                return self._live.get(device, 0)
            return sum(self._live.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._live)


LEDGER = DeviceMemoryLedger()


_GAUGES: Children[Any] | None = None  # made on first use: the metrics module loads with the first model run


def _gauge_set(device: str, value: int) -> None:
    global _GAUGES
    if _GAUGES is None:  # labels() costs more than set(); this runs four times per model run
        from xcstack.inference.metrics import DEVICE_LIVE_BYTES

        _GAUGES = Children(DEVICE_LIVE_BYTES)
    _GAUGES(device).set(value)


def _release(ledger: DeviceMemoryLedger, device: str, held: list[Any], sizes: list[int]) -> None:
    total = sum(sizes)
    held.clear()
    sizes.clear()
    if total:
        ledger.add(device, -total)


class DeviceBuffers:
    """OrtValues for one run on one device; `release()` (or leaving the `with`) frees them now.

    A `weakref.finalize` backstop releases them too if the owner is dropped without release.
    """

    def __init__(self, kind: str, device_id: int = 0, ledger: DeviceMemoryLedger = LEDGER) -> None:
        self.kind = kind
        self.device_id = device_id
        self.device = f"{kind}:{device_id}"
        self._ledger = ledger
        self._held: list[Any] = []
        self._sizes: list[int] = []
        self._finalizer = weakref.finalize(self, _release, ledger, self.device, self._held, self._sizes)

    def from_numpy(self, arr: np.ndarray) -> Any:
        from onnxruntime import OrtValue

        arr = np.ascontiguousarray(arr)
        value = OrtValue.ortvalue_from_numpy(arr, _ORT_DEVICE[self.kind], self.device_id)
        self._hold(value, arr.nbytes)
        return value

    def adopt(self, value: Any) -> Any:
        """Take ownership of an OrtValue that ORT allocated (a bound output)."""
        dtype = DTYPES.get(ONNX_TO_DATATYPE.get(value.data_type(), ""), np.dtype("<f4"))
        n = int(np.prod(value.shape())) * (8 if dtype.kind == "O" else dtype.itemsize)
        self._hold(value, n)
        return value

    def _hold(self, value: Any, n: int) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("DeviceBuffers used after release")
        self._held.append(value)
        self._sizes.append(n)
        if n:
            self._ledger.add(self.device, n)

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> DeviceBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# After a run this large (tokens x rows of one input), give the freed activations back to the OS: without an
# arena ORT frees them, but glibc keeps the pages (an e5 int8 worker stayed at 226-251 MB after one batch at
# the token budget, 160 MB after malloc_trim). The trim takes ~14 ms, under 2% of such a run.
TRIM_AFTER_ELEMENTS = 4096


# glibc mallopt parameter: the number of malloc arenas. Each thread that allocates gets an arena of its own by
# default, and each keeps the high-water mark of the batches run on it: a model worker runs tiny batches on
# its loop thread and the others on its executor thread, so two arenas each held a batch's activations (+22 MB
# after a c=64 load vs +9 MB with one arena; the two threads rarely allocate at the same moment).
_M_ARENA_MAX = -8
_MADV_DONTNEED = 4


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        return None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def configure_malloc() -> None:
    """A model worker's malloc settings, before any model loads: one arena (see _M_ARENA_MAX)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


class MappedWeights:
    """The file mappings ONNX Runtime made of a model's external data (e5's 96 MB int8 word-embedding table).

    A lookup maps the rows it reads, and the kernel maps up to 64 KB around each faulted page from the page
    cache, so the table's share of the worker's RSS grows with the vocabulary the worker has seen (+50 MB
    after the 165 Chinese passages of the retrieval set) until it holds the whole file. `drop()` unmaps the
    pages after a run (MADV_DONTNEED): the file stays in the page cache, shared by every worker holding the
    model, and the next run maps the rows it needs again (~9 minor faults per 15-token sentence, ~15 us
    per drop; no CPU difference measurable per sentence). Only read-only use is safe: ranges that already
    hold private (copied-on-write) pages are left alone.
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.drops = 0

    @classmethod
    def of(cls, directory: str | os.PathLike[str]) -> MappedWeights:
        root = os.path.realpath(directory) + os.sep
        ranges: list[tuple[int, int]] = []
        cur: tuple[int, int] | None = None
        try:
            with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    head, _, rest = line.partition(" ")
                    if "-" in head and not head.endswith(":"):  # a mapping's header line
                        parts = rest.split(None, 4)
                        path = parts[4].strip() if len(parts) == 5 else ""
                        cur = None
                        if path.startswith(root) and "x" not in parts[0]:
                            lo, hi = (int(x, 16) for x in head.split("-"))
                            cur = (lo, hi - lo)
                            ranges.append(cur)
                    elif cur is not None and head == "Anonymous:" and int(rest.split()[0]) > 0:
                        ranges.remove(cur)  # written to: its private pages must stay
                        cur = None
        except OSError:  # no /proc (not Linux): nothing to drop
            return cls([])
        return cls(ranges if _libc() is not None else [])

    def drop(self) -> None:
        libc = _libc()
        for addr, size in self.ranges:
            libc.madvise(addr, size, _MADV_DONTNEED)
        self.drops += 1


def session_options() -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's CPU arena keeps the largest batch's buffers for good: one batch at the token budget (32 x 256)
    # left an e5-small int8 worker at 1,140 MiB RSS with the arena, 185-212 MiB without it, at the same
    # CPU per batch on short texts (measured side by side, AMD EPYC, ORT 1.32)
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OrtModel:
    """One loaded model: an ORT session plus, for text models, its tokenizer."""

    def __init__(self, entry: ModelEntry, *, device_id: int = 0) -> None:
        import onnxruntime as ort

        if entry.config is None:
            raise ModelLoadError(f"model {entry.name}: {entry.error}")
        self.entry = entry
        self.config = entry.config
        self.name = entry.name
        kind = self.config.instance.execution_provider
        provider = _PROVIDERS[kind]
        available = ort.get_available_providers()
        if provider not in available:
            raise ModelLoadError(
                f"model {self.name}: execution provider {provider} is not available in this onnxruntime build"
                f" (available: {', '.join(available)}); install the matching onnxruntime package"
            )
        self.kind = kind
        self.device_id = device_id
        providers: list[Any] = [provider] if kind == "cpu" else [(provider, {"device_id": device_id})]
        try:
            self.session = ort.InferenceSession(str(entry.onnx_path), session_options(), providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: onnxruntime cannot load {entry.onnx_path}: {exc}") from None
        got_in = {i.name: ONNX_TO_DATATYPE.get(i.type, "?") for i in self.session.get_inputs()}
        want_in = {t.name: t.datatype for t in self.config.inputs}
        got_out = {o.name: ONNX_TO_DATATYPE.get(o.type, "?") for o in self.session.get_outputs()}
        want_out = {t.name: t.datatype for t in self.config.outputs}
        if got_in != want_in or not set(want_out) <= set(got_out) or any(got_out[k] != v for k, v in want_out.items()):
            raise ModelLoadError(
                f"model {self.name}: config.json tensors {want_in} -> {want_out} do not match model.onnx"
                f" {got_in} -> {got_out}"
            )
        self.output_names = [t.name for t in self.config.outputs]
        self.mapped = MappedWeights.of(entry.path)
        self.tokenizer: Any = None
        if self.config.tokenizer:
            self.tokenizer = load_tokenizer(str(entry.path / self.config.tokenizer), self.config.max_seq_length)

    def run(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs or self.output_names)
        with DeviceBuffers(self.kind, self.device_id) as bufs:
            io = self.session.io_binding()
            for name, arr in inputs.items():
                io.bind_ortvalue_input(name, bufs.from_numpy(arr))
            for name in names:
                io.bind_output(name, _ORT_DEVICE[self.kind], self.device_id)
            self.session.run_with_iobinding(io)
            values = [bufs.adopt(v) for v in io.get_outputs()]
            if self.kind == "cpu":
                result = {name: np.array(v.numpy(), copy=True) for name, v in zip(names, values, strict=True)}
            else:  # device memory: one explicit device-to-host copy per output
                result = dict(zip(names, io.copy_outputs_to_cpu(), strict=True))
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            del values, io
        if self.mapped.ranges:
            self.mapped.drop()
        if self.kind == "cpu" and max((a.size for a in inputs.values()), default=0) >= TRIM_AFTER_ELEMENTS:
            release_freed_memory()
        return result

    # --- text models ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ModelLoadError(f"model {self.name} has no tokenizer")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def embed_ids(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Pad a group of token-id sequences and run the encoder; returns [n, dims] float32."""
        n = len(seqs)
        width = max(len(s) for s in seqs)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in {t.name for t in self.config.inputs}:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.run(feed, [self.output_names[0]])[self.output_names[0]]

    # --- rerank models (kind "rerank": a cross-encoder's logits) ---------------------------------
    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(query, document) pairs as (ids, token types), truncated to max_seq_length by cutting the
        document: the query is first cut to half the length (at a token boundary, by its offsets) so
        that a document always keeps room."""
        if self.tokenizer is None:
            raise ModelLoadError(f"model {self.name} has no tokenizer")
        half = max(1, self.config.max_seq_length // 2)
        q = self.tokenizer.encode(query, add_special_tokens=False)
        if len(q.ids) > half:
            query = query[: q.offsets[half - 1][1]]
        enc = self.tokenizer.encode_batch([(query, d) for d in documents])
        return [(e.ids, e.type_ids) for e in enc]

    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        """Pad tokenized pairs and run the cross-encoder; returns [n] float32 relevance scores: the
        sigmoid of a single logit, or the softmax probability of label 1 of two."""
        n = len(pairs)
        width = max(len(p[0]) for p in pairs)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (s, t) in enumerate(pairs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
            types[i, : len(t)] = t
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in {t.name for t in self.config.inputs}:
            feed["token_type_ids"] = types
        logits = self.run(feed, [self.output_names[0]])[self.output_names[0]].astype(np.float64)
        if logits.shape[1] == 1:
            return (1.0 / (1.0 + np.exp(-logits[:, 0]))).astype(np.float32)  # type: ignore[no-any-return]
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p[:, 1] / p.sum(axis=1)).astype(np.float32)  # type: ignore[no-any-return]

    def warm(self) -> None:
        """One run per typical shape so the first real request pays no lazy initialisation."""
        if self.tokenizer is not None and self.config.kind == "rerank":
            self.score_pairs(self.tokenize_pairs("warm up", ["warm up"]))
            return
        if self.tokenizer is not None:
            self.embed_ids([self.tokenize(["warm up"])[0]])
            return
        feed: dict[str, np.ndarray] = {}
        for t in self.config.inputs:
            shape = [1 if d == -1 else d for d in t.shape]
            dtype = DTYPES[t.datatype]
            feed[t.name] = np.zeros(shape, dtype=dtype) if t.datatype != "BYTES" else np.array([b""], dtype=object)
        try:
            self.run(feed)
        except Exception as exc:  # a generic model may reject zeros; warming is best effort
            log.info("model %s: warm-up run skipped: %s", self.name, exc)


def load_tokenizer(path: str, max_len: int) -> Any:
    if path.endswith(".model"):  # SentencePiece (inference/sptokenizer.py): large vocabularies in ~4 MB
        from xcstack.inference.sptokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.load(path, max_len)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    # The shipped tokenizer.json pads/truncates to a fixed 128: match sentence-transformers instead
    # (truncate at max_seq_length, no padding here: the batcher pads each group to its longest).
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok
