"""Chinese retrieval (tests/fixtures/retrieval_zh: 88 questions in 11 domains; 165 passages, among them
same-topic near-duplicates that share the question's words but answer something else, and questions
paraphrased away from their passage's wording): recall@1 and MRR of MiniLM, e5 fp32 and e5 int8. The
multilingual default must beat the English model clearly, and int8 must stay close to fp32. Each model
embeds the set once (one pass; the sessions are shared with test_e5.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.inference.e5_helpers import embed_set, load_set, ort_model, ranked, ranks

MODELS = ("all-minilm-l6-v2", "multilingual-e5-small", "multilingual-e5-small-int8")


@pytest.fixture(scope="module")
def vectors(model_repo: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: embed_set(ort_model(model_repo, name)) for name in MODELS}


def test_fixture_shape() -> None:
    queries, passages = load_set()
    assert len(queries) >= 60 and len({q["domain"] for q in queries}) >= 10
    pids = [p["id"] for p in passages]
    assert len(pids) == len(set(pids)) and len({q["id"] for q in queries}) == len(queries)
    assert all(set(q["relevant"]) <= set(pids) for q in queries)
    assert sum(p.startswith("d") for p in pids) >= 60  # distractors


def test_ranks_counts_passages_scored_above_the_relevant_one() -> None:
    queries, passages = load_set()
    index = {x["id"]: i for i, x in enumerate(passages)}
    rel = [index[r["relevant"][0]] for r in queries]
    sims = np.zeros((len(queries), len(passages)), np.float32)  # query vectors against identity passages
    sims[np.arange(len(queries)), rel] = 1.0
    sims[1, rel[0]] = 2.0  # query 1 prefers query 0's passage: rank 2
    eye = np.eye(len(passages), dtype=np.float32)
    got = ranks(sims, eye)
    assert got[0] == 1 and got[1] == 2 and (got[2:] == 1).all()
    assert ranked(sims, eye) == pytest.approx((1 - 1 / len(queries), 1 - 0.5 / len(queries)))


def test_e5_beats_minilm_on_chinese(vectors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    table = {name: ranked(*v) for name, v in vectors.items()}
    print("\nrecall@1 / MRR on retrieval_zh:", {k: (round(a, 3), round(b, 3)) for k, (a, b) in table.items()})
    mini, fp32, int8 = (table[m] for m in MODELS)
    assert fp32[0] >= 0.8 and fp32[1] >= 0.88, fp32  # a sane floor for the multilingual model
    assert fp32[0] <= 0.98, fp32  # the set discriminates: hard items that e5 does not all get right
    assert int8[0] >= fp32[0] - 0.05 and int8[1] >= fp32[1] - 0.03, (int8, fp32)
    assert fp32[0] >= mini[0] + 0.4 and fp32[1] >= mini[1] + 0.4, (fp32, mini)  # clearly better than MiniLM


def test_int8_vectors_close_to_fp32(vectors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The whole set's 253 texts (both prefixes): int8 against fp32 from the same pass."""
    for a, b in zip(vectors["multilingual-e5-small"], vectors["multilingual-e5-small-int8"], strict=True):
        assert float((a * b).sum(1).min()) >= 0.99
