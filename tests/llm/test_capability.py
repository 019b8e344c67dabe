"""The llm capability's wiring without a model load: when a worker runs, what the supervisor and the
gateway learn, the gateway's handling of a context overflow answer, doctor's backend report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.llm.ggufw import write_gguf
from xcstack.capability import AppContext
from xcstack.config import load_settings
from xcstack.gateway.failover import rejection_body
from xcstack.llm import capability as cap
from xcstack.llm.assemble import import_gguf
from xcstack.llm.backends import llm_backends, render, summarise
from xcstack.llm.worker import KEY_ENV, PORT_ENV, THREADS_ENV, decode_threads


@pytest.fixture
def with_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    import_gguf(write_gguf(tmp_path / "t.gguf"), tmp_path / "data" / "llm-models", "tiny")
    return load_settings(data_dir=tmp_path / "data", llm={"model": "tiny", "slots": 3, "ctx_size": 1024,
                                                          "max_queue": 5})


def test_no_model_no_worker_no_upstream(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert cap.side_processes(s, None) == [] and cap.child_env(s, None) == {}
    assert s.llm.enabled and not s.llm.worker_wanted(s.data_dir)  # no model: the plan reserves no cores
    assert cap.create(AppContext(s, None)) is None  # type: ignore[arg-type]


def test_model_present_gives_a_pinned_worker_and_its_port_and_key(with_model) -> None:  # type: ignore[no-untyped-def]
    from tests.platform.test_plan import report
    from xcstack.platform.plan import derive_plan
    from xcstack.platform.planning.overrides import PlanOverrides

    s = with_model
    assert PlanOverrides.from_settings(s).llm  # the plan knows a worker will run: it gets cores of its own
    plan = derive_plan(report([0, 1, 2, 3]), s)
    assert plan.llm_cpus == [2, 3] and plan.model_cpus == [[1]] and plan.http_cpus == [[0]]
    [spec] = cap.side_processes(s, plan)
    assert spec.target == "xcstack.llm.worker:main" and list(spec.cpus) == [[2, 3]]  # its cores, one worker
    assert spec.env == {THREADS_ENV: "2"}  # threads = its cores
    env = cap.child_env(s, plan)
    assert int(env[PORT_ENV]) > 0 and len(env[KEY_ENV]) >= 24
    assert cap.child_env(s, plan)[KEY_ENV] != env[KEY_ENV]  # a fresh key per `xcstack serve`
    pinned = load_settings(data_dir=s.data_dir, llm={"model": "tiny", "cpus": [3], "threads": 5})
    [spec] = cap.side_processes(pinned, derive_plan(report([0, 1, 2, 3]), pinned))
    assert list(spec.cpus) == [[3]] and spec.env == {THREADS_ENV: "5"}
    unpinned = derive_plan(report([0, 1, 2, 3]), PlanOverrides(llm=True, pin=False))
    [spec] = cap.side_processes(s, unpinned)
    assert list(spec.cpus) == [] and spec.env == {THREADS_ENV: "2"}  # not pinned, still its share of threads
    off = load_settings(data_dir=s.data_dir, llm={"model": "tiny", "enabled": False})
    assert cap.side_processes(off, plan) == [] and not PlanOverrides.from_settings(off).llm


def test_worker_threads_from_the_plan_else_its_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert decode_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    import os

    assert decode_threads() == len(os.sched_getaffinity(0))


def test_the_gateway_gets_an_upstream_with_the_slots_queue_and_context(with_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(PORT_ENV, "45678")
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    ctx = AppContext(with_model, None)  # type: ignore[arg-type]
    assert cap.create(ctx) is not None and ctx.services.local_llm is not None
    up = ctx.services.local_llm.upstream()
    assert up.base_url == "http://127.0.0.1:45678/v1" and up.models == ["tiny"]
    assert (up.max_concurrency, up.max_queue, up.context_length, up.embeddings) == (3, 5, 1024, False)
    assert up.api_key is not None and up.api_key.get_secret_value() == "k" * 32


@pytest.mark.parametrize(("body", "code"), [
    ({"error": {"code": 400, "message": "request (1230 tokens) exceeds the available context size (512 tokens)",
                "type": "exceed_context_size_error", "n_prompt_tokens": 1230, "n_ctx": 512}},
     "context_length_exceeded"),
    ({"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you requested "
      "5000 tokens", "type": "BadRequestError"}, "context_length_exceeded"),
    ({"error": {"message": "bad temperature", "type": "invalid_request_error"}}, "upstream_rejected"),
])
def test_context_overflow_answers_are_translated_to_openai_shape(body: dict, code: str) -> None:  # type: ignore[type-arg]
    err = json.loads(rejection_body("u", 400, json.dumps(body).encode()))["error"]
    assert err["code"] == code
    if code == "context_length_exceeded":
        assert (err["type"], err["param"]) == ("invalid_request_error", "messages")


def test_doctor_reports_the_llama_cpp_backends() -> None:
    info = summarise({"installed": True, "version": "x", "devices": [{"name": "CPU"}, {"name": "CANN0"},
                                                                      {"name": "CANN1"}]})
    assert info["backends"] == ["CANN", "CPU"] and info["cann"] and info["cpu"] and not info["cuda"]
    assert "CANN yes" in "\n".join(render(info))
    real = llm_backends()
    assert real["installed"] and real["cpu"], real  # the CPU wheel installed by the dev extra
    assert "not installed" in render({"installed": False, "fix": "pip"})[1]
