"""Cross-encoder (reranker) checkpoints to ONNX: BERT and XLM-R sequence-classification models, no torch.

    input_ids INT64 [B, S], attention_mask INT64 [B, S] (, token_type_ids INT64 [B, S]: BERT only)
      -> the encoder of `graph.build_bert_onnx` (same embeddings, positions and layers)
      -> the first token's hidden state ([CLS] / <s>)
      -> dense + tanh (BERT's pooler; XLM-R's `classifier.dense`)
      -> linear (BERT's `classifier`; XLM-R's `classifier.out_proj`)
      -> logits FP32 [B, num_labels]

The encoder is built by `build_bert_onnx` with CLS pooling and then edited here: the L2 normalisation is
cut, the head is appended and (BERT) the constant token-type row becomes a lookup of `token_type_ids`, so a
query/document pair gets its segment embeddings as in training. One graph builder keeps the encoder's
numerics (positions, GELU, attention bias) identical for embedding and rerank models.

The head is two `Gemm`s, kept fp32 in the int8 copy (`HEAD_NODES`): tiny, and what the score is read from.
How a score is read from the logits is the runtime's job (`score` in the model config): one logit ->
sigmoid, two -> softmax probability of label 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from xcstack.inference.export.entries import EntryPlan, write_entries
from xcstack.inference.export.errors import ModelImportError

ARCHITECTURES: dict[str, str] = {
    "BertForSequenceClassification": "bert",
    "XLMRobertaForSequenceClassification": "xlm-roberta",
    "RobertaForSequenceClassification": "xlm-roberta",  # the same head and positions as XLM-R
}


# the head's nodes as ONNX Runtime's quantiser names them (it rewrites Gemm as MatMul + Add first): kept fp32
HEAD_NODES = ("head_dense_MatMul", "head_out_MatMul")


def cross_encoder_architecture(src: Path) -> str | None:
    """"bert" or "xlm-roberta" when `src/config.json` declares a supported sequence-classification
    architecture, None for anything else (an encoder for embeddings, or not a model directory)."""
    try:
        raw = json.loads((Path(src) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    if not isinstance(archs, list):
        return None
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    return None


def _head_weights(src: Path, family: str) -> dict[str, np.ndarray]:
    """The classification head (and, for BERT, the token-type table) from the checkpoint's safetensors."""
    from safetensors.numpy import load_file

    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{src}: no *.safetensors file")
    wanted = {
        "bert": {"dense.weight": ("pooler.dense.weight",), "dense.bias": ("pooler.dense.bias",),
                 "out.weight": ("classifier.weight",), "out.bias": ("classifier.bias",),
                 "types": ("embeddings.token_type_embeddings.weight",)},
        "xlm-roberta": {"dense.weight": ("classifier.dense.weight",), "dense.bias": ("classifier.dense.bias",),
                        "out.weight": ("classifier.out_proj.weight",), "out.bias": ("classifier.out_proj.bias",)},
    }[family]
    found: dict[str, np.ndarray] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            bare = key
            for prefix in ("bert.", "roberta.", "model."):
                if bare.startswith(prefix):
                    bare = bare[len(prefix):]
                    break
            for role, names in wanted.items():
                if bare in names:
                    found[role] = value.astype(np.float32)
    missing = [wanted[r][0] for r in wanted if r not in found and r != "types"]
    if missing:
        raise ModelImportError(f"{src}: the classification head is incomplete: {', '.join(missing)} missing")
    h = found["dense.weight"].shape
    if len(h) != 2 or h[0] != h[1] or found["out.weight"].ndim != 2 or found["out.weight"].shape[1] != h[0]:
        raise ModelImportError(f"{src}: classification head shapes {h} / {found['out.weight'].shape} do not fit")
    return found


def _drop_unused(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def build_cross_encoder_onnx(src: Path) -> tuple[Any, dict[str, Any]]:
    """Build the ONNX ModelProto of the sequence-classification checkpoint in `src`; returns (model, facts)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    from xcstack.inference.export.graph import build_bert_onnx

    src = Path(src)
    family = cross_encoder_architecture(src)
    if family is None:
        raise ModelImportError(f"{src}: config.json declares none of {', '.join(ARCHITECTURES)}")
    head = _head_weights(src, family)
    labels = int(head["out.weight"].shape[0])
    if labels not in (1, 2):
        raise ModelImportError(f"{src}: {labels} labels; a reranker has 1 (a relevance logit) or 2 (no/yes)")
    model, facts = build_bert_onnx(src, pooling="cls")
    g = model.graph
    nodes = {n.name: n for n in g.node}
    norm = nodes.get("l2norm")
    if norm is None:
        raise ModelImportError("the encoder graph has no l2norm node to replace (graph.py changed?)")
    pooled = norm.input[0]
    producers = {o: n for n in g.node for o in n.output}
    # cut the L2 normalisation: l2norm = pooled / max(ReduceL2(pooled), eps)
    drop = {id(norm)}
    clamp = producers.get(norm.input[1])
    if clamp is not None:
        drop.add(id(clamp))
        red = producers.get(clamp.input[0])
        if red is not None and red.op_type == "ReduceL2":
            drop.add(id(red))
    kept = [n for n in g.node if id(n) not in drop]
    inits = [numpy_helper.from_array(head["dense.weight"], "head.dense.weight"),
             numpy_helper.from_array(head["dense.bias"], "head.dense.bias"),
             numpy_helper.from_array(head["out.weight"], "head.out.weight"),
             numpy_helper.from_array(head["out.bias"], "head.out.bias")]
    kept += [
        helper.make_node("Gemm", [pooled, "head.dense.weight", "head.dense.bias"], ["head.dense"],
                         name="head_dense", transB=1),
        helper.make_node("Tanh", ["head.dense"], ["head.tanh"], name="head_tanh"),
        helper.make_node("Gemm", ["head.tanh", "head.out.weight", "head.out.bias"], ["logits"],
                         name="head_out", transB=1),
    ]
    inputs = [i for i in g.input]
    if family == "bert":
        types = head.get("types")
        if types is None:
            raise ModelImportError(f"{src}: embeddings.token_type_embeddings.weight missing (BERT pairs need it)")
        type0 = [i.name for i in g.initializer if i.name.startswith("type0_")]
        adds = [n for n in kept if n.op_type == "Add" and type0 and type0[0] in n.input]
        if len(adds) != 1:
            raise ModelImportError("the encoder graph has no token-type constant to replace (graph.py changed?)")
        inits.append(numpy_helper.from_array(types, "embeddings.token_type_embeddings.weight"))
        gather = helper.make_node("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"],
                                  ["token_type_emb"], name="token_type_gather", axis=0)
        add = adds[0]
        add.input[list(add.input).index(type0[0])] = "token_type_emb"
        kept.insert(kept.index(add), gather)
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
        facts["type_vocab_size"] = int(types.shape[0])
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])])
    g.name = "xcstack_cross_encoder"
    _drop_unused(model)
    checker.check_model(model, full_check=False)
    facts.update(family=family, num_labels=labels, score="sigmoid" if labels == 1 else "softmax")
    facts.pop("dimensions", None)
    return model, facts


def model_config(name: str, facts: dict[str, Any], *, quantized: str | None, source: str) -> dict[str, Any]:
    """The xcstack model config of a reranker (kind `rerank`, see repository.ModelConfig)."""
    limit = [-1, facts["max_positions"]]
    inputs = [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1], "max_shape": limit,
         "value_range": [0, facts["vocab_size"] - 1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "max_shape": limit, "value_range": [0, 1]},
    ]
    if facts["family"] == "bert":
        inputs.append({"name": "token_type_ids", "datatype": "INT64", "shape": [-1, -1], "max_shape": limit,
                       "value_range": [0, facts["type_vocab_size"] - 1]})
    return {
        "name": name,
        "platform": "onnxruntime",
        "kind": "rerank",
        "inputs": inputs,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, facts["num_labels"]]}],
        "max_batch_size": 32,
        "tokenizer": "tokenizer.json",
        "max_seq_length": facts["max_seq_length"],
        "source": {"path": source, "quantization": quantized, "architecture": facts["family"],
                   "num_labels": facts["num_labels"], "score": facts["score"]},
    }


def rerank_graph(src: Path) -> tuple[Any, EntryPlan]:
    """The `GraphBuilder` of a reranker: `build_cross_encoder_onnx`, kind "rerank", the head kept fp32."""
    model, facts = build_cross_encoder_onnx(src)

    def config(name: str, quantized: str | None, source: str) -> dict[str, Any]:
        return model_config(name, facts, quantized=quantized, source=source)

    return model, EntryPlan(facts, config, calibration_tokenizer=Path(src) / "tokenizer.json", keep_fp32=HEAD_NODES)


def import_cross_encoder(
    src: Path, dest_root: Path, name: str, *, int8_name: str | None = None, fp32: bool = True, force: bool = False,
) -> list[Path]:
    """Import the reranker in `src` into the repository `dest_root` as `name` (fp32) and/or `int8_name`
    (`export.import_model` does the same after reading the architecture from config.json)."""
    return write_entries(src, dest_root, name, rerank_graph, int8_name=int8_name, fp32=fp32, force=force)
