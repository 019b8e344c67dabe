"""Devices and config: OrtValue buffers with deterministic release (live-device-bytes back to baseline),
execution-provider selection with a clear error, repository validation, side-process specs."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.inference.conftest import inference_settings
from xcstack.inference.repository import ModelRepository
from xcstack.inference.runtime import LEDGER, DeviceBuffers, DeviceMemoryLedger, ModelLoadError, OrtModel

MODEL = "all-minilm-l6-v2"


def test_device_buffers_release_deterministically() -> None:
    ledger = DeviceMemoryLedger()
    arr = np.ones((64, 64), np.float32)
    with DeviceBuffers("cpu", 0, ledger) as bufs:
        bufs.from_numpy(arr)
        bufs.from_numpy(arr)
        assert ledger.live("cpu:0") == 2 * arr.nbytes
    assert ledger.live("cpu:0") == 0  # released on leaving the scope, not at garbage collection
    with pytest.raises(RuntimeError, match="after release"):
        bufs.from_numpy(arr)


def test_dropped_owner_is_released_by_finalizer() -> None:
    ledger = DeviceMemoryLedger()
    bufs = DeviceBuffers("cpu", 0, ledger)
    bufs.from_numpy(np.ones(1000, np.float32))
    assert ledger.live() == 4000
    del bufs
    gc.collect()
    assert ledger.live() == 0


def test_live_device_bytes_return_to_baseline_after_load(model_repo: Path) -> None:
    from xcstack.inference.metrics import DEVICE_LIVE_BYTES

    entry = ModelRepository(model_repo).scan().get(MODEL)
    assert entry is not None
    m = OrtModel(entry)
    baseline = LEDGER.live("cpu:0")
    LEDGER.peak.clear()
    for n in (1, 8, 32):
        m.embed_ids([[101, 2000 + i, 102] for i in range(n)])
    assert LEDGER.peak.get("cpu:0", 0) > baseline  # buffers were live during the runs
    assert LEDGER.live("cpu:0") == baseline
    assert DEVICE_LIVE_BYTES.labels(device="cpu:0")._value.get() == baseline


def _copy_model(src: Path, dst: Path, name: str, **changes: object) -> Path:
    shutil.copytree(src / MODEL, dst / name, ignore=shutil.ignore_patterns("model.onnx"))
    (dst / name / "model.onnx").symlink_to(src / MODEL / "model.onnx")
    cfg = json.loads((dst / name / "config.json").read_text())
    cfg["name"] = name
    cfg.update(changes)
    (dst / name / "config.json").write_text(json.dumps(cfg))
    return dst / name


def test_unavailable_execution_provider_is_a_clear_error(model_repo: Path, tmp_path: Path) -> None:
    _copy_model(model_repo, tmp_path, "gpu-model", instance={"execution_provider": "cuda", "device_ids": [1]})
    entry = ModelRepository(tmp_path).scan().get("gpu-model")
    assert entry is not None and entry.config is not None
    assert entry.config.device_id_for(0, 2) == 1
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider is not available"):
        OrtModel(entry, device_id=1)


def test_device_ids_cycle_over_instances(model_repo: Path, tmp_path: Path) -> None:
    _copy_model(model_repo, tmp_path, "m", instance={"count": 3, "execution_provider": "cann", "device_ids": [4, 5]})
    cfg = ModelRepository(tmp_path).scan().get("m").config  # type: ignore[union-attr]
    assert cfg is not None
    assert cfg.workers_for(4) == [0, 1, 2]
    assert [cfg.device_id_for(i, 4) for i in range(3)] == [4, 5, 4]


def test_invalid_model_configs_name_file_key_and_reason(model_repo: Path, tmp_path: Path) -> None:
    _copy_model(model_repo, tmp_path, "ok")
    _copy_model(model_repo, tmp_path, "badkey", colour="blue")
    _copy_model(model_repo, tmp_path, "badbatch", max_batch_size=0)
    _copy_model(model_repo, tmp_path, "baddtype", inputs=[{"name": "x", "datatype": "FLOAT", "shape": [-1]}])
    (tmp_path / "noonnx").mkdir()
    (tmp_path / "noonnx" / "config.json").write_text("{}")
    repo = ModelRepository(tmp_path).scan()
    idx = {m["name"]: m for m in repo.index()}
    assert idx["ok"]["state"] == "READY"
    assert "colour: unknown key" in idx["badkey"]["reason"]
    assert "max_batch_size" in idx["badbatch"]["reason"]
    assert "inputs.0.datatype" in idx["baddtype"]["reason"]
    assert "model.onnx: missing" in idx["noonnx"]["reason"]
    assert [m.name for m in repo.models()] == ["ok"]


def test_config_tensors_must_match_the_onnx_graph(model_repo: Path, tmp_path: Path) -> None:
    _copy_model(model_repo, tmp_path, "m", outputs=[{"name": "pooled", "datatype": "FP32", "shape": [-1, 384]}])
    with pytest.raises(ModelLoadError, match=r"do not match model\.onnx"):
        OrtModel(ModelRepository(tmp_path).scan().get("m"))  # type: ignore[arg-type]


def test_session_options_single_threaded_no_spinning() -> None:
    from xcstack.inference.runtime import session_options

    so = session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    import onnxruntime as ort

    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_side_processes_follow_plan_and_config(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    from types import SimpleNamespace

    from xcstack.inference.capability import child_env, side_processes
    from xcstack.inference.worker import COUNT_ENV, worker_count

    monkeypatch.delenv(COUNT_ENV, raising=False)

    s = inference_settings(tmp_path, model_repo)
    plan = SimpleNamespace(model_workers=3, model_cpus=[[1], [2], [3]], pin=True)
    [spec] = side_processes(s, plan)
    assert spec.target == "xcstack.inference.worker:main" and spec.instances == 3
    assert [list(c) for c in spec.cpus] == [[1], [2], [3]]
    assert spec.env["OMP_NUM_THREADS"] == "1"
    assert spec.ready_check is not None and spec.ready_check(0) is False
    # pinned children see one core: they take the count the supervisor passes them, not their own plan
    env = child_env(s, plan)
    assert env[COUNT_ENV] == "3" and COUNT_ENV not in os.environ
    for key, value in env.items():  # a child's environment
        monkeypatch.setenv(key, value)
    one_core = SimpleNamespace(model_workers=1, model_cpus=[[0]], pin=True)
    assert worker_count(s, one_core) == 3
    s2 = inference_settings(tmp_path, model_repo, workers=1, worker_cpus=[[0]])
    [spec2] = side_processes(s2, plan)
    assert spec2.instances == 1 and [list(c) for c in spec2.cpus] == [[0]]
    assert side_processes(inference_settings(tmp_path, model_repo, mode="inline"), plan) == []
    assert side_processes(inference_settings(tmp_path, tmp_path / "empty"), plan) == []  # no model, no process


def test_bad_inference_settings_fail_with_key_and_reason(tmp_path: Path) -> None:
    from xcstack.config import ConfigError, load_settings

    for bad, key in [({"request_timeout_s": 0}, "request_timeout_s"), ({"mode": "gpu"}, "mode"),
                     ({"worker_cpus": [[]]}, "worker_cpus"), ({"batching": {"max_batch_size": 0}}, "max_batch_size"),
                     ({"nope": 1}, "nope")]:
        with pytest.raises(ConfigError, match=key):
            load_settings(data_dir=tmp_path, inference=bad)


def test_routing_goes_to_holders_least_loaded_first(model_repo: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from xcstack.inference.client import ProcessBackend
    from xcstack.inference.settings import InferenceSettings

    _copy_model(model_repo, tmp_path, "everywhere")
    _copy_model(model_repo, tmp_path, "pinned", instance={"workers": [1, 3]})
    repo = ModelRepository(tmp_path).scan()
    b = ProcessBackend(repo, InferenceSettings(), [str(tmp_path / f"s{i}") for i in range(4)])
    assert b.holders == {"everywhere": [0, 1, 2, 3], "pinned": [1, 3]}
    b.clients = [SimpleNamespace(inflight=n) for n in (5, 0, 2, 7)]  # type: ignore[misc]
    assert b._order("everywhere")[0] == 1 and b._order("pinned") == [1, 3]
    b.clients = [SimpleNamespace(inflight=0) for _ in range(4)]  # type: ignore[misc]
    assert b._order("everywhere") == b._order("everywhere")  # ties: a stable hash order per model
    from xcstack.errors import NotFound

    with pytest.raises(NotFound):
        b._order("nope")
