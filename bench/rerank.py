#!/usr/bin/env python3
"""Rerank benchmark: one query x 100 documents (~100 tokens each) on `POST /v1/rerank`, c=1.

Backends, in one run, through the same http app (gateway + inference capability, models inline):
  - local cross-encoder, fp32 and int8: a MiniLM-L6-sized BertForSequenceClassification (hidden 384, 6 layers,
    12 heads, FF 1536, the real all-MiniLM-L6-v2 WordPiece vocabulary) with random weights: no reranker
    weights ship on PyPI, and the speed depends on the shape only;
  - an upstream: the mock upstream's vLLM-shaped /v1/rerank (what the gateway adds on top of a rerank server);
  - the bi-encoder fallback: all-minilm-l6-v2-int8 (cosine), against `/v1/embeddings` of the same 101 texts
    (the issue's bar: the fallback takes <= 1.2x the time of embedding them).
Reports p50/p99 per backend. Writes its section of docs/benchmarks.md. Short by default (XC_BENCH_SECONDS per
point, default 4).

    .venv/bin/python bench/rerank.py
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _report import table, write_section  # noqa: E402

SECONDS = float(os.environ.get("XC_BENCH_SECONDS", "4"))
MIN_REQUESTS = int(os.environ.get("XC_BENCH_MIN_REQUESTS", "5"))  # a local request takes seconds on one core
CACHE = ROOT / ".bench" / "rerank-models"
WORDS = ("the committee reviewed the annual budget report and approved funding for new research on river water "
         "quality while local residents asked about flood protection near the old bridge in the city centre").split()


def document(i: int) -> str:
    return " ".join(WORDS[(i * 5 + k * 7) % len(WORDS)] for k in range(90))  # ~100 WordPiece tokens


QUERY = "how is the city protecting residents from river floods?"
DOCS = [document(i) for i in range(100)]


def make_models() -> Path:
    """all-minilm-l6-v2(-int8) and the MiniLM-sized reranker `ce` / `ce-int8`, built once into .bench/."""
    import numpy as np
    from safetensors.numpy import save_file

    from xcstack.inference.export import default_source, import_default
    from xcstack.inference.export.cross_encoder import import_cross_encoder

    repo = CACHE / "repo"
    if not (repo / "all-minilm-l6-v2-int8" / "model.onnx").is_file():
        import_default(repo, if_missing=True)
    if not (repo / "ce-int8" / "model.onnx").is_file():
        src = CACHE / "ce-src"
        src.mkdir(parents=True, exist_ok=True)
        (src / "tokenizer.json").write_bytes((default_source() / "tokenizer.json").read_bytes())
        h, layers, ff, vocab = 384, 6, 1536, 30522
        rng = np.random.default_rng(0)

        def w(*shape: int, scale: float = 0.05) -> np.ndarray:
            return (rng.standard_normal(shape) * scale).astype(np.float32)

        t = {"bert.embeddings.word_embeddings.weight": w(vocab, h), "bert.embeddings.position_embeddings.weight":
             w(512, h), "bert.embeddings.token_type_embeddings.weight": w(2, h),
             "bert.embeddings.LayerNorm.weight": np.ones(h, np.float32), "bert.embeddings.LayerNorm.bias": w(h),
             "bert.pooler.dense.weight": w(h, h), "bert.pooler.dense.bias": w(h), "classifier.weight": w(1, h),
             "classifier.bias": w(1)}
        for i in range(layers):
            p = f"bert.encoder.layer.{i}."
            for name, shape in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                                "attention.self.value": (h, h), "attention.output.dense": (h, h),
                                "intermediate.dense": (ff, h), "output.dense": (h, ff)}.items():
                t[p + name + ".weight"] = w(*shape)
                t[p + name + ".bias"] = w(shape[0])
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                t[p + ln + ".weight"] = np.ones(h, np.float32)
                t[p + ln + ".bias"] = w(h)
        save_file(t, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({
            "architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": h,
            "num_hidden_layers": layers, "num_attention_heads": 12, "intermediate_size": ff, "vocab_size": vocab,
            "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu", "num_labels": 1}))
        import_cross_encoder(src, repo, "ce", int8_name="ce-int8", force=True)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def serve(overrides: dict[str, Any], port: int) -> None:
    """The http app (gateway + inference capability, inline models) on `port` (the child process)."""
    from xcstack.app import create_app
    from xcstack.config import load_settings
    from xcstack.worker import run_uvicorn

    settings = load_settings(**overrides)
    app = create_app(settings, capability_modules=["xcstack.gateway.capability", "xcstack.inference.capability"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.set_inheritable(True)
    run_uvicorn(settings, sock, app)


async def point(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as r:  # warm
        assert r.status == 200, await r.text()
        last = await r.json()
    lat: list[float] = []
    end = time.monotonic() + SECONDS
    while time.monotonic() < end or len(lat) < MIN_REQUESTS:
        t0 = time.perf_counter()
        async with session.post(url, json=body) as r:
            await r.read()
            assert r.status == 200
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"n": len(lat), "p50": statistics.median(lat) * 1000, "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            * 1000, "method": last.get("method", "-")}


async def measure(port: int) -> list[tuple[str, dict[str, Any]]]:
    base = f"http://127.0.0.1:{port}"
    rr = base + "/v1/rerank"
    runs = [
        ("local cross-encoder fp32 (`ce`)", rr, {"model": "ce", "query": QUERY, "documents": DOCS}),
        ("local cross-encoder int8 (`ce-int8`)", rr, {"model": "ce-int8", "query": QUERY, "documents": DOCS}),
        ("upstream (mock vLLM /v1/rerank) via the gateway", rr,
         {"model": "mock-rerank", "query": QUERY, "documents": DOCS}),
        ("bi-encoder fallback (all-minilm-l6-v2-int8)", rr,
         {"model": "all-minilm-l6-v2-int8", "query": QUERY, "documents": DOCS}),
        ("/v1/embeddings of the same 101 texts (same model)", base + "/v1/embeddings",
         {"model": "all-minilm-l6-v2-int8", "input": [QUERY, *DOCS]}),
    ]
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for name, url, body in runs[:3]:
            out.append((name, await point(s, url, body)))
        out += await interleaved(s, runs[3:])
    return out


async def interleaved(session: aiohttp.ClientSession, runs: list[tuple[str, str, dict[str, Any]]]
                      ) -> list[tuple[str, dict[str, Any]]]:
    """The fallback and plain embeddings request by request in turn, so that the machine's load (shared,
    noisy) falls on both alike: their ratio is the figure that matters."""
    lat: list[list[float]] = [[] for _ in runs]
    last: list[dict[str, Any]] = [{} for _ in runs]
    end = time.monotonic() + 2 * SECONDS
    first = True
    while time.monotonic() < end or len(lat[0]) < MIN_REQUESTS:
        for i, (_, url, body) in enumerate(runs):
            t0 = time.perf_counter()
            async with session.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                last[i] = await r.json()
            if not first:  # the first round warms
                lat[i].append(time.perf_counter() - t0)
        first = False
    out = []
    for (name, _, _), xs, body in zip(runs, lat, last, strict=True):
        xs.sort()
        out.append((name, {"n": len(xs), "p50": statistics.median(xs) * 1000,
                           "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, "method": body.get("method", "-")}))
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]), int(sys.argv[3]))
        return
    repo = make_models()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mport, gport = free_port(), free_port()
        mock = subprocess.Popen([sys.executable, "-m", "xcstack.gateway.cli", "mock-upstream", "--port", str(mport),
                                 "--models", "mock-rerank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mock)
        wait_port(mport, mock)
        with tempfile.TemporaryDirectory() as data:
            overrides = {"data_dir": data, "inference": {"mode": "inline", "model_repository": str(repo),
                                       "request_timeout_s": 300},
                         "gateway": {"upstreams": [{"name": "mock", "base_url": f"http://127.0.0.1:{mport}/v1",
                                                    "models": ["mock-rerank"]}]}}
            srv = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(overrides), str(gport)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(srv)
            wait_port(gport, srv, timeout=120)
            load0 = os.getloadavg()[0]
            results = asyncio.run(measure(gport))
            load1 = os.getloadavg()[0]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = [[name, r["method"], r["n"], f"{r['p50']:.1f}", f"{r['p99']:.1f}"] for name, r in results]
    bi, emb = results[3][1], results[4][1]
    ratio = bi["p50"] / emb["p50"]
    for name, r in results:
        print(f"{name:55s} p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  n={r['n']}")
    print(f"bi-encoder / embeddings p50 ratio: {ratio:.2f}")
    body = "\n".join([
        "## Rerank (`bench/rerank.py`)",
        "",
        "One query x 100 documents (~100 WordPiece tokens each) on `POST /v1/rerank`, one request at a time (c=1), "
        "through one http app (gateway + inference capability, models inline: a thread in the http worker). The "
        "local cross-encoder is MiniLM-L6-sized (384 hidden, 6 layers, the real 30,522-token vocabulary) with random "
        "weights: no reranker ships its weights on PyPI, and speed depends on the shape only. The upstream row is "
        "the mock upstream's vLLM-shaped `/v1/rerank` (a lexical toy): the gateway's own cost on an upstream "
        "reranker. Latencies in ms.",
        "",
        table(["backend", "method", "requests", "p50", "p99"], rows),
        "",
        f"The bi-encoder fallback takes **{ratio:.2f}x** the time of embedding the same 101 texts with "
        "`/v1/embeddings` (p50; the issue's bar: <= 1.2x). A cross-encoder reads every (query, document) pair, "
        "~100 rows of ~115 tokens, which is why it costs more than the bi-encoder's 101 single texts.",
        "The fallback and the embeddings rows were measured request by request in turn (same load on both).",
        f"Shared 2-core machine, other agents' tests running (load average {load0:.1f} at the start, {load1:.1f} "
        "at the end): absolute times are inflated several-fold; read the figures as ratios within the run.",
    ])
    write_section("rerank", f"XC_BENCH_SECONDS={SECONDS:g} XC_BENCH_MIN_REQUESTS={MIN_REQUESTS} "
                  ".venv/bin/python bench/rerank.py", body)


if __name__ == "__main__":
    main()
