"""Fixtures of the inference tests: the default model imported once per session into a temp repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "inference"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding all-minilm-l6-v2 (fp32) and -int8, built by the importer (no torch)."""
    from xcstack.inference.importer import import_default

    cached = os.environ.get("XC_TEST_MODEL_REPO")
    if cached and (Path(cached) / "all-minilm-l6-v2" / "model.onnx").is_file():
        return Path(cached)
    root = tmp_path_factory.mktemp("models")
    import_default(root)
    return root


@pytest.fixture(scope="session")
def reference() -> tuple[list[str], np.ndarray]:
    meta = json.loads((FIXTURES / "reference_sentences.json").read_text())
    return list(meta["sentences"]), np.load(FIXTURES / "reference_embeddings.npy")
