"""`xcstack model import`: the ONNX graph built without torch matches sentence-transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inference.conftest import MODEL_NAMES
from xcstack.inference.export import ModelImportError, default_source, import_model
from xcstack.inference.export.graph import build_bert_onnx
from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import OrtModel


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(repo: Path, name: str, sentences: list[str], one_by_one: bool = False) -> np.ndarray:
    entry = ModelRepository(repo).scan().get(name)
    assert entry is not None and entry.config is not None, entry
    m = OrtModel(entry)
    ids = m.tokenize(sentences)
    if one_by_one:
        return np.concatenate([m.embed_ids([s]) for s in ids])
    return m.embed_ids(ids)


def test_fp32_matches_sentence_transformers(model_repo: Path, reference: tuple[list[str], np.ndarray]) -> None:
    sentences, ref = reference
    assert any("\u4e00" <= ch <= "\u9fff" for s in sentences for ch in s), "the set must include Chinese"
    for one in (False, True):  # padded batch and unpadded single rows agree
        cos = _cos(_embed(model_repo, "all-minilm-l6-v2", sentences, one), ref)
        assert cos.min() >= 0.9999, cos


def test_int8_quality_every_sentence(model_repo: Path, reference: tuple[list[str], np.ndarray]) -> None:
    """The issue's bar for int8: cosine >= 0.985 against sentence-transformers for EVERY sentence (the
    punctuation-only one was 0.981 with plain per-channel dynamic quantisation), in a padded batch and
    one sentence at a time."""
    sentences, ref = reference
    for one in (False, True):
        cos = _cos(_embed(model_repo, "all-minilm-l6-v2-int8", sentences, one), ref)
        assert cos.min() >= 0.985, dict(zip(sentences, cos.round(4).tolist(), strict=True))
        assert cos.mean() >= 0.99, cos
    cfg = json.loads((model_repo / "all-minilm-l6-v2-int8" / "config.json").read_text())
    assert cfg["source"]["quantization"] == (
        "smoothquant-a0.6+int8-dynamic-per-channel+ffn_out-matmulnbits8-b128")


def test_int8_graph_is_mostly_integer(model_repo: Path) -> None:
    """The speed comes from integer MatMuls: every weight MatMul is MatMulInteger or MatMulNBits."""
    import onnx

    model = onnx.load(str(model_repo / "all-minilm-l6-v2-int8" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 6  # one FFN output projection per layer
    assert ops.count("MatMulInteger") == 30  # q, k, v, attention output, FFN input x 6 layers
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight.T")]
    assert weight_matmuls == []


def test_embeddings_are_unit_norm_and_truncated_at_256(model_repo: Path) -> None:
    entry = ModelRepository(model_repo).scan().get("all-minilm-l6-v2")
    assert entry is not None
    m = OrtModel(entry)
    ids = m.tokenize(["word " * 1000, "short"])
    assert len(ids[0]) == 256 and len(ids[1]) < 10  # not the tokenizer.json's fixed 128 padding
    out = m.embed_ids(ids)
    assert out.shape == (2, 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_graph_has_pooling_and_norm_inside() -> None:
    model, facts = build_bert_onnx(default_source())
    ops = {n.op_type for n in model.graph.node}
    assert {"ReduceSum", "ReduceL2", "Div", "LayerNormalization", "Erf"} <= ops
    assert [o.name for o in model.graph.output] == ["embeddings"]
    assert facts == {"dimensions": 384, "max_seq_length": 256, "pooling": "mean", "layers": 6,
                     "max_positions": 512, "vocab_size": 30522}


def test_import_rejects_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match=r"config\.json not found"):
        import_model(tmp_path, tmp_path / "repo", "x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelImportError, match="not a BERT-family encoder"):
        import_model(tmp_path, tmp_path / "repo", "x")


def test_import_refuses_to_overwrite(model_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelImportError, match="exists; pass --force"):
        import_model(default_source(), tmp_path, "m")


def test_cli_import_default_if_missing_is_idempotent(model_repo: Path, tmp_path: Path) -> None:
    # pre-seed the target with the session's models so the CLI path only checks presence
    repo = tmp_path / "models"
    repo.mkdir()
    for name in MODEL_NAMES:  # every pair import-default brings (MiniLM and the multilingual e5)
        (repo / name).symlink_to(model_repo / name)
    out = subprocess.run(
        [sys.executable, "-m", "xcstack", "model", "import-default", "--if-missing", "--repository", str(repo)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "already" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "xcstack", "model", "list", "--repository", str(repo)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert {m["name"]: m["state"] for m in json.loads(out.stdout)} == {name: "READY" for name in MODEL_NAMES}


def test_cli_import_prefixed_checkpoint(tmp_path: Path, model_repo: Path) -> None:
    """`xcstack model import SRC --name N --int8`: a checkpoint with `bert.`-prefixed weights (the
    BertModel-with-head layout) imports too, and gives the same vectors."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    base = default_source()
    for f in ("config.json", "tokenizer.json"):
        (src / f).write_bytes((base / f).read_bytes())
    weights = load_file(str(base / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in weights.items()}, str(src / "model.safetensors"))
    repo = tmp_path / "repo"
    out = subprocess.run(
        [sys.executable, "-m", "xcstack", "model", "import", str(src), "--name", "mini", "--int8",
         "--repository", str(repo)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (repo / "mini" / "model.onnx").is_file() and (repo / "mini-int8" / "model.onnx").is_file()
    a = _embed(repo, "mini", ["prefix test 前缀"])
    b = _embed(model_repo, "all-minilm-l6-v2", ["prefix test 前缀"])
    assert float((a * b).sum()) > 0.99999
    # a broken source is a clear one-line error, exit 1
    out = subprocess.run([sys.executable, "-m", "xcstack", "model", "import", str(tmp_path / "nope"),
                          "--repository", str(repo)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "config.json not found" in out.stderr


@pytest.mark.parametrize("k", [256, 200])  # 200: K not a multiple of the block, the last block is padded
def test_matmul_nbits_conversion_matches_fp32(k: int) -> None:
    """to_matmul_nbits: 8-bit block-wise weights with int8 compute stay within int8 rounding of fp32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from xcstack.inference.export.quantise import to_matmul_nbits

    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, 48)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    assert to_matmul_nbits(model, {"mm"}, block_size=128) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert "w" not in {i.name for i in model.graph.initializer}  # the fp32 weight is gone
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(5, k)).astype(np.float32)
    x[0, 3] = 40.0  # one token with a massive activation does not spoil the other rows (per-row scales)
    got = sess.run(None, {"x": x})[0]
    want = x @ w
    cos = _cos(got, want)
    assert cos.min() > 0.999, cos
    onnx.checker.check_model(model)
