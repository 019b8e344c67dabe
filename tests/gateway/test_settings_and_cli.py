"""Config validation (bad config fails with key + reason), the mock-upstream CLI, metrics."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GatewayServer, MockUpstream
from xcstack.config import ConfigError, load_settings


def _load(tmp_path: Path, text: str) -> Any:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_settings(p)


GOOD = """
[[gateway.upstreams]]
name = "a"
base_url = "http://127.0.0.1:8000/v1/"
api_key = "sk-upstream"
models = ["qwen2.5-7b"]
aliases = { "qwen" = "qwen2.5-7b" }
weight = 2
[gateway.upstreams.timeouts]
ttfb_s = 30
"""


def test_valid_config_loads_and_masks_secret(tmp_path: Path) -> None:
    s = _load(tmp_path, GOOD)
    u = s.gateway.upstreams[0]
    assert u.base_url == "http://127.0.0.1:8000/v1" and u.timeouts.ttfb_s == 30 and u.weight == 2
    assert "sk-upstream" not in repr(s) and u.api_key.get_secret_value() == "sk-upstream"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (GOOD.replace('"http://127.0.0.1:8000/v1/"', '"ftp://x"'), "gateway.upstreams.0.base_url", "http"),
        (GOOD.replace('"qwen" = "qwen2.5-7b"', '"qwen" = "missing"'), "gateway.upstreams.0", "not in models"),
        (GOOD.replace("weight = 2", "weight = -1"), "gateway.upstreams.0.weight", "greater than 0"),
        (GOOD.replace("ttfb_s = 30", "ttfb_s = 0"), "gateway.upstreams.0.timeouts.ttfb_s", "greater than 0"),
        (GOOD.replace("weight = 2", "wieght = 2"), "gateway.upstreams.0.wieght", "unknown key"),
        (GOOD.replace('models = ["qwen2.5-7b"]', "models = []"), "gateway.upstreams.0.models", "at least 1"),
        (GOOD + GOOD.split("[gateway.upstreams.timeouts]")[0], "gateway", "unique"),
        ("[gateway]\nmax_in_flight = 0\n", "gateway.max_in_flight", "greater than or equal to 1"),
        (GOOD.replace("weight = 2", "recv_buffer_bytes = 100"), "gateway.upstreams.0.recv_buffer_bytes",
         "at least 4096"),
        ("[gateway]\nredis_url = \"http://x\"\n", "gateway.redis_url", "redis://"),
        ("[gateway.rate_limit]\nrequests_per_minute = -5\n", "gateway.rate_limit.requests_per_minute", ">= 0"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    msg = str(ei.value)
    assert key in msg, msg
    assert reason.lower() in msg.lower() or (reason == ">= 0" and "greater than or equal to 0" in msg), msg


def test_mock_upstream_registered_in_xcstack_cli() -> None:
    from xcstack.cli import build_parser

    args = build_parser().parse_args(["mock-upstream", "--port", "1", "--fault", "stall", "--ttft", "0.5"])
    assert args.fault == "stall" and args.ttft == 0.5 and callable(args.func)


def test_mock_upstream_faults_and_stats(mock: MockUpstream) -> None:
    url = mock.base_url + "/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert httpx.post(url, json={**body, "mock": {"fault": "500"}}).status_code == 500
    r = httpx.post(url, json={**body, "mock": {"fault": "429"}})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    with pytest.raises(httpx.TransportError):
        httpx.post(url, json={**body, "mock": {"fault": "reset"}})
    mock.configure(fault="500", fault_times=1)
    assert httpx.post(url, json=body).status_code == 500
    assert httpx.post(url, json=body).status_code == 200  # fault_times exhausted
    st = mock.stats()
    assert st["faults"] == 4 and st["requests"] == 5
    with pytest.raises(httpx.HTTPStatusError):
        httpx.post(mock.root + "/mock/config", json={"fault": "bogus"}).raise_for_status()


def test_metrics_usage_ttft_and_in_flight(gateway: GatewayServer) -> None:
    h = {"Authorization": "Bearer metrics-key"}
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 7}
    assert httpx.post(gateway.base_url + "/chat/completions", json=body, headers=h).status_code == 200
    assert httpx.post(gateway.base_url + "/chat/completions", json={**body, "stream": True}, headers=h
                      ).status_code == 200
    # this key's series only (the gateway serves other tests too); a stream is accounted just after its
    # last byte, so wait for it
    key = "k:" + hashlib.sha256(b"metrics-key").hexdigest()[:16]
    series = re.escape(f'{{key="{key}",model="mock-model"}}')
    gen_count_re = rf"^xc_gateway_key_generation_seconds_count{series} ([0-9.]+)$"
    deadline = time.monotonic() + 5
    text = httpx.get(gateway.url + "/metrics").text
    while re.findall(gen_count_re, text, re.M) != ["2.0"] and time.monotonic() < deadline:
        time.sleep(0.05)
        text = httpx.get(gateway.url + "/metrics").text
    comp = re.findall(rf'^xc_gateway_tokens_total\{{key="{key}",kind="completion",model="mock-model"\}} ([0-9.]+)$',
                      text, re.M)
    assert comp and float(comp[0]) >= 14
    assert re.search(r'^xc_gateway_ttft_seconds_count\{model="mock-model"\} [1-9]', text, re.M)
    assert re.search(r'^xc_gateway_tokens_per_second_count\{model="mock-model"\} [1-9]', text, re.M)
    assert re.search(r"^xc_gateway_in_flight 0.0$", text, re.M)
    # per key too: mean TTFT, and generation time for both calls, the non-streamed one included, so that
    # tokens/s = completion tokens / generation seconds is not overstated
    assert re.findall(rf"^xc_gateway_key_ttft_seconds_count{series} ([0-9.]+)$", text, re.M) == ["1.0"]
    assert re.findall(gen_count_re, text, re.M) == ["2.0"]
    gen_sum = re.findall(rf"^xc_gateway_key_generation_seconds_sum{series} ([0-9.e-]+)$", text, re.M)
    assert gen_sum and float(gen_sum[0]) > 0
    assert "metrics-key" not in text
