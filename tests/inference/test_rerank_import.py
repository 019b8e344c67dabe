"""`xcstack model import` of cross-encoders: BERT and XLM-R sequence-classification checkpoints to ONNX,
checked against a numpy reference forward pass of a small checkpoint generated here (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.inference.rerank_fixtures import make_checkpoint, pair_batch, reference_logits
from xcstack.inference.export import ModelImportError
from xcstack.inference.export.cross_encoder import cross_encoder_architecture, import_cross_encoder
from xcstack.inference.repository import ModelRepository

PAIRS = [
    ("what is the capital of france?", "paris is the capital of france."),
    ("what is the capital of france?", "berlin is a city in germany, in europe."),
    ("cat", "the cat sat on the mat."),
    ("北京", "北京是中国的首都."),
    ("river bank", "the money is in the bank, the water in the river. " * 3),
]


@pytest.fixture(scope="module", params=[("bert", 1), ("xlm-roberta", 2)], ids=["bert-1logit", "xlmr-2logits"])
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    family, labels = request.param
    root = tmp_path_factory.mktemp(f"ce-{family}")
    src = make_checkpoint(root / "src", family, labels=labels)
    import_cross_encoder(src, root / "repo", "ce", int8_name="ce-int8")
    return src, root / "repo", family


def _run(path: Path, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, family: str) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        feed["token_type_ids"] = types
    return np.asarray(sess.run(["logits"], feed)[0])


def test_fp32_logits_match_numpy_reference(imported: tuple[Path, Path, str]) -> None:
    src, repo, family = imported
    pad = 1 if family == "xlm-roberta" else 0
    ids, mask, types = pair_batch(src / "tokenizer.json", PAIRS, pad)
    ref = reference_logits(src, ids, mask, types)
    got = _run(repo / "ce" / "model.onnx", ids, mask, types, family)
    assert got.shape == ref.shape == (len(PAIRS), 1 if family == "bert" else 2)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    # the second segment matters (BERT: its token-type embedding; both: the pair itself)
    assert np.ptp(ref[:, -1]) > 0.05
    if family == "bert":
        flat = reference_logits(src, ids, mask, np.zeros_like(types))
        assert np.abs(flat - ref).max() > 1e-3, "token types must change the logits of a BERT pair"
    # one pair at a time (no padding) agrees with the padded batch
    for i in range(len(PAIRS)):
        n = int(mask[i].sum())
        one = _run(repo / "ce" / "model.onnx", ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n], family)
        np.testing.assert_allclose(one[0], ref[i], atol=2e-4, rtol=1e-3)


def test_int8_close_to_fp32(imported: tuple[Path, Path, str]) -> None:
    import onnx

    src, repo, family = imported
    pad = 1 if family == "xlm-roberta" else 0
    pairs = PAIRS + [(d, q) for q, d in PAIRS]
    ids, mask, types = pair_batch(src / "tokenizer.json", pairs, pad)
    fp = _run(repo / "ce" / "model.onnx", ids, mask, types, family)
    q = _run(repo / "ce-int8" / "model.onnx", ids, mask, types, family)
    # A 32-wide random encoder is far harder on int8 than a trained one (no redundant channels, calibration
    # text that is mostly unknown words here): near-ties may swap and the logits may shift, so ask only that
    # the relevance logit moves with fp32's (no reranker weights exist on PyPI to test the quality bar on)
    s_fp, s_q = (fp[:, 0], q[:, 0]) if family == "bert" else (fp[:, 1] - fp[:, 0], q[:, 1] - q[:, 0])
    assert np.corrcoef(s_fp, s_q)[0, 1] >= 0.95, (s_q, s_fp)
    ops = {n.op_type for n in onnx.load(str(repo / "ce-int8" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops  # the encoder is quantised, the head is not:
    heads = [n for n in onnx.load(str(repo / "ce-int8" / "model.onnx")).graph.node if n.name.startswith("head_")]
    assert heads and not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in heads)


def test_repository_entry(imported: tuple[Path, Path, str]) -> None:
    _src, repo, family = imported
    entries = ModelRepository(repo).scan()
    for name in ("ce", "ce-int8"):
        e = entries.get(name)
        assert e is not None and e.config is not None, e
        assert e.config.kind == "rerank"
        assert [t.name for t in e.config.outputs] == ["logits"]
        names = [t.name for t in e.config.inputs]
        assert ("token_type_ids" in names) == (family == "bert")
        assert e.config.source["score"] == ("sigmoid" if family == "bert" else "softmax")


def test_detection_and_refusals(tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "bert", "bert", labels=1)
    assert cross_encoder_architecture(src) == "bert"
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert cross_encoder_architecture(src) is None
    three = make_checkpoint(tmp_path / "three", "bert", labels=3)
    with pytest.raises(ModelImportError, match="3 labels"):
        import_cross_encoder(three, tmp_path / "repo", "x")
    headless = make_checkpoint(tmp_path / "headless", "xlm-roberta", labels=1)
    from safetensors.numpy import load_file, save_file

    w = load_file(str(headless / "model.safetensors"))
    del w["classifier.out_proj.weight"]
    save_file(w, str(headless / "model.safetensors"))
    with pytest.raises(ModelImportError, match=r"classifier\.out_proj\.weight missing"):
        import_cross_encoder(headless, tmp_path / "repo", "y")


def test_model_import_detects_a_cross_encoder(tmp_path: Path) -> None:
    """`xcstack model import` (export.import_model) builds a reranker for a …ForSequenceClassification checkpoint."""
    from xcstack.inference.export import import_model

    src = make_checkpoint(tmp_path / "src", "bert", labels=2)
    written = import_model(src, tmp_path / "repo", "r", int8_name=None)
    cfg = json.loads((written[0] / "config.json").read_text())
    assert cfg["kind"] == "rerank" and cfg["outputs"][0]["name"] == "logits" and cfg["source"]["score"] == "softmax"
