"""Per-API-key series are bounded: the first N keys keep their own `key` label, the rest share
`other` (N = 0: one `-` series); the setting reaches the gateway's metrics."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from xcstack.app import create_app
from xcstack.config import load_settings
from xcstack.gateway import metrics
from xcstack.observability.metrics import BoundedLabel, Children


def _key_values(registry: CollectorRegistry) -> set[str]:
    return {s.labels["key"] for m in registry.collect() for s in m.samples if s.name == "t_tokens_total"}


def test_n_plus_5_keys_make_at_most_n_plus_1_series() -> None:
    n = 4
    registry = CollectorRegistry()
    tokens = metrics.Keyed(Counter("t_tokens", "t", ["key", "model"], registry=registry), BoundedLabel(n))
    for i in range(n + 5):
        for _ in range(2):  # a key seen again stays where it was
            tokens.labels(f"key-{i}", "m").inc()
    values = _key_values(registry)
    assert len(values) == n + 1 and values == {*(f"key-{i}" for i in range(n)), "other"}
    assert registry.get_sample_value("t_tokens_total", {"key": "other", "model": "m"}) == 10
    assert registry.get_sample_value("t_tokens_total", {"key": "key-0", "model": "m"}) == 2


def test_zero_means_no_per_key_series() -> None:
    registry = CollectorRegistry()
    tokens = metrics.Keyed(Counter("t_tokens", "t", ["key", "model"], registry=registry), BoundedLabel(0))
    for i in range(10):
        tokens.labels(f"key-{i}", "m").inc()
    assert _key_values(registry) == {"-"}


def test_children_are_cached_and_bounded() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_cached", "t", ["a"], registry=registry)
    children = Children(counter, limit=2)
    assert children("x") is children("x")
    children("y")
    children("z").inc()  # past the limit: still counted, not cached
    assert children("z") is not None and registry.get_sample_value("t_cached_total", {"a": "z"}) == 1


def test_the_setting_reaches_the_gateway_metrics(data_dir: Path) -> None:
    before = metrics.KEYS.limit
    try:
        settings = load_settings(None, data_dir=data_dir, security={"enabled": False}, gateway={"metrics_keys": 3})
        create_app(settings, ["xcstack.gateway.capability"])
        assert metrics.KEYS.limit == 3
    finally:
        metrics.limit_keys(before)
