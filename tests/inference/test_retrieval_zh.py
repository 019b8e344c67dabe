"""Chinese retrieval (tests/fixtures/retrieval_zh: 66 questions, 11 domains, 99 passages with distractors):
recall@1 and MRR of MiniLM, e5 fp32 and e5 int8. The multilingual default must beat the English model clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import OrtModel

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "retrieval_zh"


def load_set() -> tuple[list[dict[str, object]], list[dict[str, str]]]:
    queries = [json.loads(x) for x in (FIXTURE / "queries.jsonl").read_text().splitlines() if x.strip()]
    passages = [json.loads(x) for x in (FIXTURE / "passages.jsonl").read_text().splitlines() if x.strip()]
    return queries, passages


def scores(model: OrtModel, query_prefix: str, passage_prefix: str) -> tuple[float, float]:
    """(recall@1, MRR) of the model on the set, passages embedded in batches of 16."""
    queries, passages = load_set()

    def embed(texts: list[str]) -> np.ndarray:
        return np.concatenate([model.embed_ids(model.tokenize(texts[i : i + 16])) for i in range(0, len(texts), 16)])

    q = embed([query_prefix + str(x["query"]) for x in queries])
    p = embed([passage_prefix + x["text"] for x in passages])
    ids = [x["id"] for x in passages]
    ranks = []
    for row, query in zip(q @ p.T, queries, strict=True):
        order = [ids[i] for i in np.argsort(-row)]
        ranks.append(min(order.index(r) for r in query["relevant"]) + 1)  # type: ignore[attr-defined]
    r = np.array(ranks, dtype=np.float64)
    return float((r == 1).mean()), float((1.0 / r).mean())


def test_fixture_shape() -> None:
    queries, passages = load_set()
    assert len(queries) >= 60 and len({q["domain"] for q in queries}) >= 10
    pids = {p["id"] for p in passages}
    assert all(set(q["relevant"]) <= pids for q in queries)  # type: ignore[arg-type]
    assert sum(p["id"].startswith("d") for p in passages) >= 30  # distractors


def test_e5_beats_minilm_on_chinese(model_repo: Path) -> None:
    repo = ModelRepository(model_repo).scan()
    table = {}
    for name in ("all-minilm-l6-v2", "multilingual-e5-small", "multilingual-e5-small-int8"):
        entry = repo.get(name)
        assert entry is not None and entry.config is not None
        table[name] = scores(OrtModel(entry), entry.config.query_prefix, entry.config.passage_prefix)
    print("\nrecall@1 / MRR on retrieval_zh:", {k: (round(a, 3), round(b, 3)) for k, (a, b) in table.items()})
    mini, fp32, int8 = table.values()
    assert fp32[0] >= 0.85 and fp32[1] >= 0.9, fp32  # a sane floor for the multilingual model
    assert int8[0] >= fp32[0] - 0.05 and int8[1] >= fp32[1] - 0.03, (int8, fp32)
    assert fp32[0] >= mini[0] + 0.2 and fp32[1] >= mini[1] + 0.15, (fp32, mini)  # clearly better than MiniLM
