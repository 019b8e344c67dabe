"""Small randomly initialised cross-encoder checkpoints (BERT and XLM-R sequence classification) written as
a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), and a numpy reference
forward pass of them: no torch, no download. No package ships reranker weights (../shared/FIELD-NOTES.md),
so the real loading code is tested on what the tests generate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ["what", "is", "the", "capital", "of", "france", "paris", "a", "city", "in", "europe", "berlin",
         "germany", "cat", "dog", "sat", "on", "mat", "river", "bank", "money", "water", "##s", "##ing",
         "北", "京", "中", "国", "的", "首", "都", "是", "?", ".", ","]


def write_tokenizer(path: Path, family: str) -> dict[str, int]:
    """A tiny WordPiece tokenizer.json with the pair template of the family; returns its vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        cls, sep, unk = "[CLS]", "[SEP]", "[UNK]"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls, sep, unk = "<s>", "</s>", "<unk>"
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if family == "bert":
        pair = f"{cls} $A {sep} $B:1 {sep}:1"
    else:  # XLM-R: <s> A </s></s> B </s>, one segment
        pair = f"{cls} $A {sep} {sep} $B {sep}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok.save(str(path))
    return vocab


def make_checkpoint(root: Path, family: str, *, labels: int = 1, hidden: int = 32, layers: int = 2, heads: int = 4,
                    intermediate: int = 64, max_positions: int = 64, seed: int = 0) -> Path:
    """Write a random sequence-classification checkpoint for `family` ("bert" or "xlm-roberta") into `root`."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(root / "tokenizer.json", family)
    v = len(vocab)
    xlmr = family == "xlm-roberta"
    pre = "roberta." if xlmr else "bert."
    types = 1 if xlmr else 2

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t: dict[str, np.ndarray] = {
        pre + "embeddings.word_embeddings.weight": w(v, hidden, scale=0.5),
        pre + "embeddings.position_embeddings.weight": w(max_positions, hidden, scale=0.5),
        pre + "embeddings.token_type_embeddings.weight": w(types, hidden, scale=0.5),
        pre + "embeddings.LayerNorm.weight": 1 + w(hidden, scale=0.1),
        pre + "embeddings.LayerNorm.bias": w(hidden, scale=0.1),
    }
    for i in range(layers):
        p = f"{pre}encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
                             "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
                             "intermediate.dense": (intermediate, hidden), "output.dense": (hidden, intermediate)
                             }.items():
            t[p + name + ".weight"] = w(o, n, scale=1 / math.sqrt(n))
            t[p + name + ".bias"] = w(o, scale=0.05)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + w(hidden, scale=0.1)
            t[p + ln + ".bias"] = w(hidden, scale=0.1)
    if xlmr:
        t["classifier.dense.weight"] = w(hidden, hidden, scale=1 / math.sqrt(hidden))
        t["classifier.dense.bias"] = w(hidden, scale=0.05)
        t["classifier.out_proj.weight"] = w(labels, hidden, scale=1.0)
        t["classifier.out_proj.bias"] = w(labels, scale=0.1)
    else:
        t[pre + "pooler.dense.weight"] = w(hidden, hidden, scale=1 / math.sqrt(hidden))
        t[pre + "pooler.dense.bias"] = w(hidden, scale=0.05)
        t["classifier.weight"] = w(labels, hidden, scale=1.0)
        t["classifier.bias"] = w(labels, scale=0.1)
    save_file(t, str(root / "model.safetensors"))
    config: dict[str, Any] = {
        "architectures": ["XLMRobertaForSequenceClassification" if xlmr else "BertForSequenceClassification"],
        "model_type": family, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "vocab_size": v, "max_position_embeddings": max_positions,
        "type_vocab_size": types, "layer_norm_eps": 1e-5 if xlmr else 1e-12, "hidden_act": "gelu",
        "pad_token_id": 1 if xlmr else 0, "num_labels": labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf)


def reference_logits(root: Path, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    """The Hugging Face forward pass of the checkpoint in numpy (float64): BertForSequenceClassification /
    XLMRobertaForSequenceClassification in eval mode. XLM-R positions as `create_position_ids_from_input_ids`
    computes them: padding_idx + cumsum(ids != padding_idx), padding at padding_idx."""
    from safetensors.numpy import load_file

    cfg = json.loads((root / "config.json").read_text())
    xlmr = cfg["model_type"] == "xlm-roberta"
    pre = "roberta." if xlmr else "bert."
    t = {k: v.astype(np.float64) for k, v in load_file(str(root / "model.safetensors")).items()}
    eps = cfg["layer_norm_eps"]
    n_heads = cfg["num_attention_heads"]
    if xlmr:
        pad = cfg["pad_token_id"]
        real = (ids != pad).astype(np.int64)
        pos = np.cumsum(real, axis=1) * real + pad
        types = np.zeros_like(ids)
    else:
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        types = np.zeros_like(ids) if types is None else types
    x = (t[pre + "embeddings.word_embeddings.weight"][ids] + t[pre + "embeddings.position_embeddings.weight"][pos]
         + t[pre + "embeddings.token_type_embeddings.weight"][types])
    x = _ln(x, t[pre + "embeddings.LayerNorm.weight"], t[pre + "embeddings.LayerNorm.bias"], eps)
    b, s, h = x.shape
    hd = h // n_heads
    bias = (1.0 - mask[:, None, None, :]) * np.finfo(np.float64).min

    def lin(z: np.ndarray, name: str) -> np.ndarray:
        return z @ t[name + ".weight"].T + t[name + ".bias"]

    for i in range(cfg["num_hidden_layers"]):
        p = f"{pre}encoder.layer.{i}."

        def split(z: np.ndarray) -> np.ndarray:
            return z.reshape(b, s, n_heads, hd).transpose(0, 2, 1, 3)

        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x1 = _ln(lin(ctx, p + "attention.output.dense") + x, t[p + "attention.output.LayerNorm.weight"],
                 t[p + "attention.output.LayerNorm.bias"], eps)
        inter = lin(x1, p + "intermediate.dense")
        inter = 0.5 * inter * (1.0 + _erf(inter / math.sqrt(2.0)))
        x = _ln(lin(inter, p + "output.dense") + x1, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"],
                eps)
    first = x[:, 0]
    if xlmr:
        return lin(np.tanh(lin(first, "classifier.dense")), "classifier.out_proj")
    return lin(np.tanh(lin(first, pre + "pooler.dense")), "classifier")


def pair_batch(tokenizer_path: Path, pairs: list[tuple[str, str]], pad_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize pairs with the checkpoint's tokenizer and pad them: (ids, mask, token types)."""
    from tokenizers import Tokenizer

    enc = Tokenizer.from_file(str(tokenizer_path)).encode_batch(pairs)
    width = max(len(e.ids) for e in enc)
    ids = np.full((len(enc), width), pad_id, np.int64)
    mask = np.zeros((len(enc), width), np.int64)
    types = np.zeros((len(enc), width), np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
        types[i, : len(e.ids)] = e.type_ids
    return ids, mask, types
