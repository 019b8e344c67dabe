"""The `rerank` model kind in the model workers: (query, document) pairs tokenized as pairs (the document
truncated first), each pair one row of the dynamic batch under the token budget; score = sigmoid of a
single logit (or the probability of label 1 of two). Inline and through a model worker process."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.inference.conftest import Workers, inference_settings
from tests.inference.rerank_fixtures import make_checkpoint, pair_batch, reference_logits
from xcstack.errors import XCError
from xcstack.inference.client import InlineBackend, ProcessBackend
from xcstack.inference.export import import_model
from xcstack.inference.export.cross_encoder import import_cross_encoder
from xcstack.inference.local import LocalModels
from xcstack.inference.repository import ModelRepository
from xcstack.inference.settings import InferenceSettings

QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france.", "berlin is a city in germany.", "the cat sat on the mat.",
        "北京是中国的首都.", "the money is in the bank, the water in the river."]


@pytest.fixture(scope="module")
def ce_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A repository with a BERT reranker (`ce`, 1 logit), an XLM-R one (`ce2`, 2 logits) and a tiny
    embedding model (`emb`, the BERT encoder without its head)."""
    root = tmp_path_factory.mktemp("rerank-rt")
    bert = make_checkpoint(root / "bert", "bert", labels=1, max_positions=40)
    xlmr = make_checkpoint(root / "xlmr", "xlm-roberta", labels=2, seed=1)
    repo = root / "repo"
    import_cross_encoder(bert, repo, "ce")
    import_cross_encoder(xlmr, repo, "ce2")
    emb = root / "emb"
    shutil.copytree(bert, emb)
    cfg = json.loads((emb / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (emb / "config.json").write_text(json.dumps(cfg))
    import_model(emb, repo, "emb")
    return repo, bert, xlmr


def _expected(src: Path, query: str, docs: list[str], pad: int) -> np.ndarray:
    ids, mask, types = pair_batch(src / "tokenizer.json", [(query, d) for d in docs], pad)
    logits = reference_logits(src, ids, mask, types)
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits[:, 0]))  # type: ignore[no-any-return]
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p[:, 1] / p.sum(1)  # type: ignore[no-any-return]


def _local(repo: Path, backend: Any) -> LocalModels:
    return LocalModels(backend.settings, ModelRepository(repo).scan(), backend, None)


def test_inline_scores_batching_and_refusals(ce_repo: tuple[Path, Path, Path]) -> None:
    repo, bert, _ = ce_repo
    settings = InferenceSettings.model_validate(
        {"model_repository": str(repo), "mode": "inline", "batching": {"token_budget": 64, "max_wait_ms": 20}})

    async def go() -> None:
        backend = InlineBackend(ModelRepository(repo).scan(), settings)
        await backend.start()
        try:
            local = _local(repo, backend)
            assert local.rerank_models() == ["ce", "ce2"]
            scores, usage = await local.rerank("ce", QUERY, DOCS)
            np.testing.assert_allclose(scores, _expected(bert, QUERY, DOCS, 0), atol=1e-4)
            assert scores.dtype == np.float32 and ((scores > 0) & (scores < 1)).all()
            mask = pair_batch(bert / "tokenizer.json", [(QUERY, d) for d in DOCS], 0)[1]
            assert usage["total_tokens"] == int(mask.sum())
            # pairs are rows of the dynamic batch, grouped with other requests' rows under the token budget
            b = backend.core.models["ce"].batcher
            before_batches, before_rows = b.batches_run, b.rows_run
            many = [f"{w} is the capital of france." for w in ("paris", "berlin", "a city", "europe")] * 6
            results = await asyncio.gather(*(local.rerank("ce", QUERY, many) for _ in range(3)))
            for r, _u in results:
                np.testing.assert_allclose(r, results[0][0], atol=1e-5)
            rows = b.rows_run - before_rows
            batches = b.batches_run - before_batches
            assert rows == 72
            longest = max(len(x[0]) for x in backend.core.models["ce"].model.tokenize_pairs(QUERY, many))
            assert batches >= -(-72 // (64 // longest))  # the budget bounds longest x rows per run
            # a reranker is not an embedding model and an embedding model is not a reranker
            with pytest.raises(XCError) as e1:
                await local.rerank("emb", QUERY, DOCS)
            assert e1.value.code == "model_not_found"
            with pytest.raises(XCError) as e2:
                await backend.embed("ce", ["x"], 5.0)
            assert e2.value.code == "not_an_embedding_model"
            with pytest.raises(XCError) as e3:
                await backend.rerank("emb", QUERY, DOCS, 5.0)
            assert e3.value.code == "not_a_rerank_model" and e3.value.status == 400
        finally:
            await backend.stop()

    asyncio.run(go())


def test_pairs_truncate_the_document_first(ce_repo: tuple[Path, Path, Path]) -> None:
    from xcstack.inference.runtime import OrtModel

    repo, _, _ = ce_repo
    m = OrtModel(ModelRepository(repo).scan().get("ce"))  # type: ignore[arg-type]
    limit = m.config.max_seq_length
    long_doc = "the cat sat on the mat. " * 40
    (ids, types), = m.tokenize_pairs(QUERY, [long_doc])
    assert len(ids) == limit
    q_len = len(m.tokenizer.encode(QUERY, add_special_tokens=False).ids)
    assert types.count(0) == q_len + 2  # [CLS] query [SEP]: the query is whole, the document was cut
    long_query = "paris " * 100  # a query longer than the model reads keeps half of it, the document the rest
    (ids2, types2), = m.tokenize_pairs(long_query, ["berlin is a city in germany."])
    assert len(ids2) <= limit and types2.count(1) == len("berlin is a city in germany.".split()) + 2
    assert 0 < float(m.score_pairs([(ids, types), (ids2, types2)]).min())


def test_process_worker_two_logits(ce_repo: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Through a model worker process (IPC op `rerank`), the XLM-R two-logit head: P(label 1)."""
    repo, _, xlmr = ce_repo
    settings = inference_settings(tmp_path, repo, mode="process", workers=1, request_timeout_s=10)
    workers = Workers(settings, 1)

    async def go() -> None:
        from xcstack.inference.worker import socket_path

        backend = ProcessBackend(ModelRepository(repo).scan(), settings.inference, [str(socket_path(settings, 0))])
        try:
            local = _local(repo, backend)
            scores, usage = await local.rerank("ce2", QUERY, DOCS)
            ref = _expected(xlmr, QUERY, DOCS, 1)
            assert np.argsort(scores).tolist() == np.argsort(ref).tolist()
            assert usage["total_tokens"] > len(DOCS) * 4
            one, _ = await local.rerank("ce2", QUERY, DOCS[:1])
            assert one.shape == (1,)
            with pytest.raises(XCError) as e:
                await backend.rerank("emb", QUERY, DOCS, 5.0)
            assert e.value.code == "not_a_rerank_model"
        finally:
            await backend.stop()

    try:
        asyncio.run(go())
    finally:
        workers.stop()
