"""The one import sequence of every model kind: check, build the fp32 graph, quantise, install entries.

A graph builder (`GraphBuilder`: `cli.embedding_graph`, `cross_encoder.rerank_graph`) turns a checkpoint
into an ONNX model and an `EntryPlan` that says what differs by kind (the model config, the files served
beside the graph, the calibration tokenizer, the nodes kept fp32). `write_entries` does the rest the same
way for all: each entry is staged in a temporary folder and renamed into place, so a reader never sees
half a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcstack.inference.export.errors import ModelImportError

#: an initializer at least this big goes to `model.onnx.data` beside the graph: ONNX Runtime memory-maps
#: external data on CPU, so a 250k-row embedding table costs only the rows that texts touch, and its pages
#: are shared by every model worker (measured: e5 int8 session +53 MB instead of +156 MB)
EXTERNAL_DATA_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class EntryPlan:
    """What a graph builder says about the entries of its model (the graph itself travels apart, so the
    import can drop it once saved: an e5 fp32 graph is ~470 MB)."""

    facts: dict[str, Any]
    #: (entry name, quantization scheme or None, source label) -> the entry's config.json
    config: Callable[[str, str | None, str], dict[str, Any]]
    #: what the int8 calibration tokenises its sample texts with
    calibration_tokenizer: Path
    #: files copied from the checkpoint into each entry
    files: tuple[str, ...] = ("tokenizer.json",)
    #: node names the int8 copy leaves fp32
    keep_fp32: tuple[str, ...] = ()


GraphBuilder = Callable[[Path], tuple[Any, EntryPlan]]


def _install_onnx(src: Path, dest: Path) -> None:
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if not any(len(t.raw_data) >= EXTERNAL_DATA_BYTES for t in model.graph.initializer):
        shutil.copyfile(src, dest)
        return
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dest.name + ".data", size_threshold=EXTERNAL_DATA_BYTES)


def write_entries(
    src: Path,
    dest_root: Path,
    name: str,
    build: GraphBuilder,
    *,
    int8_name: str | None = None,
    fp32: bool = True,
    force: bool = False,
    source_label: str | None = None,
) -> list[Path]:
    """Build `src` with `build` and install it into the repository `dest_root` as `name` (fp32) and/or
    `int8_name` (int8); the cheap checks run before the graph is built."""
    import onnx

    from xcstack.inference.export.quantise import quantize_int8

    src = Path(src)
    if not (src / "config.json").is_file():
        raise ModelImportError(f"{src}: config.json not found (expected a Hugging Face model directory)")
    if not (src / "tokenizer.json").is_file():
        raise ModelImportError(f"{src}: tokenizer.json not found")
    for t in ([name] if fp32 else []) + ([int8_name] if int8_name else []):
        if (dest_root / t).exists() and not force:
            raise ModelImportError(f"{dest_root / t} exists; pass --force to replace it")
    model, plan = build(src)
    dest_root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".import-") as tmp:
        tmpd = Path(tmp)
        fp32_path = tmpd / "fp32.onnx"
        onnx.save_model(model, str(fp32_path))
        del model
        outputs: list[tuple[str, Path, str | None]] = [(name, fp32_path, None)] if fp32 else []
        if int8_name:
            q_path = tmpd / "int8.onnx"
            scheme = quantize_int8(fp32_path, q_path, tokenizer_path=plan.calibration_tokenizer,
                                   max_len=plan.facts["max_seq_length"], exclude=list(plan.keep_fp32) or None)
            outputs.append((int8_name, q_path, scheme))
        for model_name, onnx_path, quant in outputs:
            stage = tmpd / model_name
            stage.mkdir()
            _install_onnx(onnx_path, stage / "model.onnx")
            for f in plan.files:
                shutil.copyfile(src / f, stage / f)
            cfg = plan.config(model_name, quant, source_label or str(src))
            (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            final = dest_root / model_name
            if final.exists():
                shutil.rmtree(final)
            stage.rename(final)  # atomic within one filesystem: a reader never sees half a model
            written.append(final)
    return written
