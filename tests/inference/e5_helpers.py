"""Shared by test_e5.py, test_retrieval_zh.py and bench/embeddings.py: one ORT session per (repository, model)
for the whole test session (loading e5 costs seconds), and the Chinese retrieval set with its scoring."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import OrtModel

RETRIEVAL = Path(__file__).resolve().parent.parent / "fixtures" / "retrieval_zh"


@functools.cache
def ort_model(repo: Path, name: str) -> OrtModel:
    entry = ModelRepository(repo).scan().get(name)
    assert entry is not None and entry.config is not None, entry
    return OrtModel(entry)


def load_set() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    queries = [json.loads(x) for x in (RETRIEVAL / "queries.jsonl").read_text().splitlines() if x.strip()]
    passages = [json.loads(x) for x in (RETRIEVAL / "passages.jsonl").read_text().splitlines() if x.strip()]
    return queries, passages


def embed_all(model: OrtModel, texts: list[str], batch: int = 32) -> np.ndarray:
    """Unit vectors of `texts` in their order, run in batches of similar length (little padding)."""
    seqs = model.tokenize(texts)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = [model.embed_ids([seqs[i] for i in order[k : k + batch]]) for k in range(0, len(order), batch)]
    vecs = np.concatenate(parts)
    out = np.empty_like(vecs)
    out[order] = vecs
    return out


def embed_set(model: OrtModel) -> tuple[np.ndarray, np.ndarray]:
    """(query vectors, passage vectors) of the retrieval set with the model's own prefixes."""
    queries, passages = load_set()
    cfg = model.config
    return (embed_all(model, [cfg.query_prefix + str(q["query"]) for q in queries]),
            embed_all(model, [cfg.passage_prefix + p["text"] for p in passages]))


def ranks(q: Any, p: Any) -> np.ndarray:
    """The rank (1 = first) of each query's best relevant passage among all passages, by cosine."""
    queries, passages = load_set()
    q, p = np.asarray(q, np.float32), np.asarray(p, np.float32)
    index = {x["id"]: i for i, x in enumerate(passages)}
    sims = q @ p.T
    out = []
    for row, query in zip(sims, queries, strict=True):
        best = max(row[index[r]] for r in query["relevant"])
        out.append(int((row > best).sum()) + 1)
    return np.array(out)


def ranked(q: Any, p: Any) -> tuple[float, float]:
    """(recall@1, MRR) from query and passage vectors."""
    r = ranks(q, p).astype(np.float64)
    return float((r == 1).mean()), float((1.0 / r).mean())
