"""The int8 copy of an exported encoder: activation smoothing, block-wise 8-bit FFN-out, dynamic int8 elsewhere.

Plain per-channel dynamic int8 left the worst sentence at cosine 0.981 because of the encoder's massive
[CLS]/[SEP] activations; the measured choices are in docs/inference.md ("int8") and
scripts/inference_int8_variants.py.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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
    wants_types = "token_type_ids" in {i.name for i in sess.get_inputs()}  # a BERT cross-encoder
    for feed in _calibration_feeds(load_tokenizer(str(tokenizer_path), max_len), sentences):
        if wants_types:  # single texts: segment 0 throughout
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
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
    signed_weights: bool = False,
    exclude: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
) -> str:
    """int8 copy of `src` in `dst`; returns a short description of the scheme (for config.json).

    1. with `tokenizer_path` and `smooth_alpha`: activation smoothing (`smooth_for_int8`);
    2. the MatMuls of `blockwise_roles` (default: every FFN output projection, whose input carries the
       [CLS] token's massive activations) become 8-bit block-wise MatMulNBits (`to_matmul_nbits`);
    3. every other weight MatMul not in `exclude`: `quantize_dynamic(per_channel=True)` (MatMulInteger,
       one dynamic activation scale per tensor: the fastest kernels) with **uint8 weights**.
       Why not int8 weights (onnxruntime's usual U8S8): MLAS multiplies uint8 activations by int8 weights
       with `vpmaddubsw` on x86 CPUs without VNNI (AVX2-only, AVX-512 without VNNI), which adds pairs of
       products into int16 and saturates (VNNI's `vpdpbusd` does not): the same code and onnxruntime
       (1.32) gave a worst reference sentence of 0.992 where docs/inference.md was measured and
       0.924 on an AVX2-only EPYC. U8U8 kernels widen to int16 before multiplying: exact on every CPU
       (0.992 on that EPYC too, and no slower there). `reduce_range` (7-bit weights) also avoids the
       overflow but loses precision (0.990); `signed_weights=True` restores U8S8 (only for measuring it).
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
            weight_type=QuantType.QInt8 if signed_weights else QuantType.QUInt8,  # see the docstring
            op_types_to_quantize=["MatMul"],  # embeddings (Gather) stay fp32: cheap, and quality-sensitive
            nodes_to_exclude=sorted(set(exclude or []) | blockwise),
            extra_options=dict(extra_options or {}),
        )
    if blockwise:
        model = onnx.load(str(dst))
        to_matmul_nbits(model, blockwise, block_size=block_size)
        onnx.save_model(model, str(dst))
    parts = [f"smoothquant-a{smooth_alpha:g}" if smoothed else "",
             "int8-dynamic-" + ("per-channel" if per_channel else "per-tensor") + ("-s8w" if signed_weights else ""),
             f"{'+'.join(blockwise_roles)}-matmulnbits8-b{block_size}" if blockwise else "",
             f"{len(exclude)}-fp32" if exclude else ""]
    return "+".join(p for p in parts if p)

