"""Fixtures of the supply tests: one SBOM of the test venv, generated once per session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xcstack.config import load_settings
from xcstack.supply.cli import generate

MODEL_README = """---
license: apache-2.0
language: en
---
# tiny test model
"""


@pytest.fixture(scope="session")
def supply_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("supply-data")
    model = d / "models" / "tiny-encoder"
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 16)
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "README.md").write_text(MODEL_README)
    return d


@pytest.fixture(scope="session")
def sbom_docs(supply_data_dir: Path) -> Iterator[dict[str, Any]]:
    settings = load_settings(None, data_dir=supply_data_dir)
    timings: dict[str, float] = {}
    texts = generate(settings, fmt="both", data_dir=supply_data_dir, timings=timings)
    yield {"cyclonedx": json.loads(texts["cyclonedx"]), "spdx": json.loads(texts["spdx"]), "texts": texts,
           "timings": timings}


@pytest.fixture(scope="session")
def cdx(sbom_docs: dict[str, Any]) -> dict[str, Any]:
    return sbom_docs["cyclonedx"]  # type: ignore[no-any-return]
