"""Readiness that means it (issue 13, item 5): an enabled inference capability with no model to serve
is not ready, and says why and what to run; a node meant to run without local models disables
inference and is ready."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from xcstack.app import create_app
from xcstack.config import load_settings

from .conftest import inference_settings

INFERENCE = ["xcstack.inference.capability"]


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_no_model_is_not_ready(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    settings = inference_settings(tmp_path / "data", repo, mode=mode, workers=1)
    with TestClient(create_app(settings, INFERENCE), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        check = r.json()["checks"]["inference"]
        assert check["ready"] is False
        assert check["detail"] == f"degraded: no model in {repo}; run `xcstack model import-default`"
        kserve = c.get("/v2/health/ready")
        assert kserve.status_code == 503 and kserve.json()["ready"] is False


def test_only_broken_models_is_not_ready_and_says_why(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "half-copied").mkdir(parents=True)
    (repo / "half-copied" / "config.json").write_text("{}")
    settings = inference_settings(tmp_path / "data", repo, mode="inline")
    with TestClient(create_app(settings, INFERENCE), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        detail = r.json()["checks"]["inference"]["detail"]
        assert detail.startswith(f"degraded: no model in {repo} that loads (")
        assert "half-copied" in detail and "model.onnx: missing" in detail and "import-default" in detail


def test_inference_disabled_node_is_ready_without_models(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", inference={"enabled": False})
    with TestClient(create_app(settings, INFERENCE), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and "inference" not in r.json()["checks"]


def test_with_a_model_it_is_ready(tmp_path: Path, model_repo: Path) -> None:
    settings = inference_settings(tmp_path / "data", model_repo, mode="inline")
    with TestClient(create_app(settings, INFERENCE), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["inference"]["ready"] is True


def test_onnxruntime_that_crashes_means_no_local_inference_not_a_crashed_worker(
    tmp_path: Path, model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under qemu-user `import onnxruntime` dies with SIGSEGV. The plan then has no model workers, and
    the http side must not load the models inline instead (the same import would kill the http worker):
    it answers 503 with the reason, and readiness says so."""
    from xcstack.inference.capability import UNAVAILABLE_ENV, InferenceCapability, child_env, side_processes
    from xcstack.inference.worker import COUNT_ENV, current_plan

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "onnxruntime.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", str(stubs))  # the probe's import children see the crashing build
    for key in (COUNT_ENV, UNAVAILABLE_ENV):
        monkeypatch.delenv(key, raising=False)  # restored at teardown, whatever side_processes sets
    settings = inference_settings(tmp_path / "data", model_repo, mode="process")

    plan = current_plan(settings)
    assert plan.model_workers == 0 and "SIGSEGV" in plan.inference_unavailable, plan.inference_unavailable
    cap = InferenceCapability(settings)  # not supervised: derives the plan itself
    assert type(cap.backend).__name__ == "UnavailableBackend"

    before = dict(os.environ)
    assert side_processes(settings, plan) == []  # the supervisor: no model worker, and it tells its http workers
    env = child_env(settings, plan)
    assert "SIGSEGV" in env[UNAVAILABLE_ENV] and env[COUNT_ENV] == "0"
    assert dict(os.environ) == before  # through each child's environment, not this process's
    for key, value in env.items():  # what an http worker the supervisor started finds
        monkeypatch.setenv(key, value)
    with TestClient(create_app(settings, INFERENCE), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        detail = r.json()["checks"]["inference"]["detail"]
        assert detail.startswith("degraded: local inference cannot run on this machine: onnxruntime is not")
        assert "SIGSEGV" in detail
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "inference_unavailable", r.text
