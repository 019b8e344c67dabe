"""The importer on RoBERTa / XLM-R / BERT encoders: the ONNX graph agrees with a numpy reference forward pass
(Hugging Face's, positions included) of a small randomly initialised checkpoint written here, and
unsupported architectures are refused naming themselves and the supported list."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from xcstack.inference.export import ModelImportError, import_model
from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import OrtModel

WORDS = ["the", "cat", "sat", "on", "mat", "北", "京", "是", "首", "都", "?", "."]
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 40


def _checkpoint(root: Path, model_type: str, seed: int = 0) -> Path:
    """A random encoder checkpoint (`<prefix>.`-named weights as the HF *Model classes save them)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    bert = model_type == "bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    cls, sep, unk = (specials[2], specials[3], specials[1]) if bert else (specials[0], specials[2], specials[3])
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}",
                                                       special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok.save(str(root / "tokenizer.json"))
    pre = "bert." if bert else "roberta."

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {pre + "embeddings.word_embeddings.weight": w(len(vocab), HIDDEN, scale=0.5),
         pre + "embeddings.position_embeddings.weight": w(POSITIONS, HIDDEN, scale=0.8),
         pre + "embeddings.token_type_embeddings.weight": w(2 if bert else 1, HIDDEN, scale=0.5),
         pre + "embeddings.LayerNorm.weight": 1 + w(HIDDEN, scale=0.1),
         pre + "embeddings.LayerNorm.bias": w(HIDDEN, scale=0.1)}
    for i in range(LAYERS):
        p = f"{pre}encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                             "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
                             "intermediate.dense": (FFN, HIDDEN), "output.dense": (HIDDEN, FFN)}.items():
            t[p + name + ".weight"] = w(o, n, scale=1 / math.sqrt(n))
            t[p + name + ".bias"] = w(o, scale=0.05)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + w(HIDDEN, scale=0.1)
            t[p + ln + ".bias"] = w(HIDDEN, scale=0.1)
    save_file(t, str(root / "model.safetensors"))
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}[model_type]
    (root / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": model_type, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": FFN, "vocab_size": len(vocab),
        "max_position_embeddings": POSITIONS, "type_vocab_size": 2 if bert else 1, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12 if bert else 1e-5, "pad_token_id": 0 if bert else 1}))
    return root


def _reference(root: Path, ids: np.ndarray) -> np.ndarray:
    """Hugging Face's forward pass in float64 numpy, then masked mean pooling and L2 normalisation.
    Positions: BERT 0..S-1; RoBERTa/XLM-R `create_position_ids_from_input_ids`: padding_idx +
    cumsum(ids != padding_idx) for real tokens, padding_idx for padding."""
    from safetensors.numpy import load_file

    cfg = json.loads((root / "config.json").read_text())
    pre = "bert." if cfg["model_type"] == "bert" else "roberta."
    t = {k[len(pre):]: v.astype(np.float64) for k, v in load_file(str(root / "model.safetensors")).items()}
    pad = cfg["pad_token_id"]
    mask = (ids != pad).astype(np.float64)
    if cfg["model_type"] == "bert":
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    else:
        real = (ids != pad).astype(np.int64)
        pos = np.cumsum(real, axis=1) * real + pad
    eps = cfg["layer_norm_eps"]

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        norm = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        return norm * t[name + ".weight"] + t[name + ".bias"]

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][pos]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    b, s, h = x.shape
    hd = h // HEADS
    erf = np.vectorize(math.erf)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).reshape(b, s, HEADS, hd).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + (1 - mask[:, None, None, :]) * -1e9
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inter = lin(x, p + "intermediate.dense")
        inter = 0.5 * inter * (1 + erf(inter / math.sqrt(2)))
        x = ln(lin(inter, p + "output.dense") + x, p + "output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("model_type", ["xlm-roberta", "roberta", "bert"])
def test_encoder_matches_numpy_reference(tmp_path: Path, model_type: str) -> None:
    """A padded batch of different lengths: the XLM-R/RoBERTa rows only agree when real tokens are numbered
    from padding_idx + 1 (positions from 0 gave cosine ~0.9 here, the bug this guards)."""
    src = _checkpoint(tmp_path / "src", model_type)
    import_model(src, tmp_path / "repo", "m")
    entry = ModelRepository(tmp_path / "repo").scan().get("m")
    assert entry is not None and entry.config is not None, entry
    if model_type != "bert":  # the first padding_idx + 1 rows of the position table are not positions
        assert entry.config.inputs[0].max_shape == [-1, POSITIONS - 2]
    m = OrtModel(entry)
    texts = ["the cat sat on the mat .", "北 京 是 首 都 ?", "cat"]
    seqs = m.tokenize(texts)
    got = m.embed_ids(seqs)
    pad = 0 if model_type == "bert" else 1
    ids = np.full((len(seqs), max(map(len, seqs))), pad, np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    want = _reference(src, ids)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize(("model_type", "arch"), [("distilbert", "DistilBertModel"), ("gpt2", "GPT2Model"),
                                                  ("deberta-v2", "DebertaV2Model")])
def test_unsupported_architecture_refused_by_name(tmp_path: Path, model_type: str, arch: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelImportError) as err:
        import_model(tmp_path, tmp_path / "repo", "x")
    msg = str(err.value)
    assert arch in msg and model_type in msg
    assert "supported: BERT (bert), RoBERTa (roberta), XLM-RoBERTa (xlm-roberta)" in msg
    assert not (tmp_path / "repo" / "x").exists()


def test_decoder_and_relative_positions_refused(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "src", "bert")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "is_decoder": True}))
    with pytest.raises(ModelImportError, match="is_decoder"):
        import_model(src, tmp_path / "repo", "x")
    (src / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ModelImportError, match="absolute position"):
        import_model(src, tmp_path / "repo", "x")
