"""Typed composition (issue 14 items 1 and 7): capabilities declare the services they provide, need
and use; the app creates providers first and refuses, at start, a cycle, a missing or disabled
provider, a name provided twice or a service set without a declaration, naming them. One registry
serves the app, the supervisor and the CLI; the supervisor passes what capabilities tell their
children through each child's environment, never its own.

The capability modules below are real modules (registered in `sys.modules`, imported by the app as
any plugin is), each a few lines."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import BaseRoute
from starlette.testclient import TestClient

from xcstack import cli
from xcstack.app import CompositionError, create_app, order_modules
from xcstack.capability import (
    CAPABILITY_MODULES,
    CLI_MODULES,
    REGISTRY,
    AppContext,
    Services,
    Wiring,
)
from xcstack.config import Settings, load_settings

EVENTS: list[str] = []


class Double:
    """A capability that records when it starts and stops."""

    def __init__(self, name: str) -> None:
        self.name = name

    def routes(self) -> Sequence[BaseRoute]:
        return []

    async def start(self) -> None:
        EVENTS.append(f"start {self.name}")

    async def stop(self) -> None:
        EVENTS.append(f"stop {self.name}")

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """plugin(name, wiring, create=None) -> module name; create(ctx) defaults to a Double."""

    def make(name: str, wiring: Wiring | None = None, create: Callable[[AppContext], Any] | None = None) -> str:
        module = types.ModuleType(f"xc_test_{name}")
        if wiring is not None:
            module.WIRING = wiring  # type: ignore[attr-defined]
        module.create = create or (lambda ctx: Double(name))  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return module.__name__

    EVENTS.clear()
    yield make


def _settings(tmp_path: Path) -> Settings:
    return load_settings(None, data_dir=tmp_path, security={"enabled": False})


def test_the_real_capabilities_are_created_providers_first() -> None:
    from importlib import import_module

    order = order_modules([(m, import_module(m).WIRING) for m in CAPABILITY_MODULES])
    pos = {m.split(".")[1]: i for i, m in enumerate(order)}
    assert pos["crypto"] < pos["security"] < pos["gateway"] and pos["security"] < pos["db"]
    assert pos["inference"] < pos["gateway"] and pos["inference"] < pos["vector"]


def test_start_follows_providers_routes_follow_the_list(tmp_path: Path, plugin: Callable[..., str]) -> None:
    def provide(ctx: AppContext) -> Double:
        ctx.services.crypto = object()  # type: ignore[assignment]
        return Double("provider")

    seen: list[Any] = []

    def use(ctx: AppContext) -> Double:
        seen.append(ctx.services.crypto)
        return Double("user")

    user = plugin("user", Wiring(needs=("crypto",)), use)
    provider = plugin("provider", Wiring(provides=("crypto",)), provide)
    app = create_app(_settings(tmp_path), [user, provider])
    assert seen and seen[0] is not None  # the provider was created first although listed second
    assert [c.name for c in app.state.xc.capabilities] == ["user", "provider"]  # routes, readiness: as listed
    with TestClient(app):
        pass
    assert EVENTS == ["start provider", "start user", "stop user", "stop provider"]


def test_a_cycle_is_refused_naming_modules_and_services(tmp_path: Path, plugin: Callable[..., str]) -> None:
    a = plugin("a", Wiring(provides=("crypto",), uses=("local_embedder",)))
    b = plugin("b", Wiring(provides=("local_embedder",), needs=("crypto",)))
    with pytest.raises(CompositionError) as ei:
        create_app(_settings(tmp_path), [a, b])
    assert str(ei.value) == f"capability cycle: {a} -(local_embedder)-> {b} -(crypto)-> {a}"


def test_a_need_nobody_provides_is_refused(tmp_path: Path, plugin: Callable[..., str]) -> None:
    needy = plugin("needy", Wiring(needs=("secrets",)))
    with pytest.raises(CompositionError, match=f"^{needy} needs service 'secrets', which no capability in the app"):
        create_app(_settings(tmp_path), [needy])
    # `uses` is optional: the same module that only uses it starts without a provider
    relaxed = plugin("relaxed", Wiring(uses=("secrets",)))
    assert [c.name for c in create_app(_settings(tmp_path), [relaxed]).state.xc.capabilities] == ["relaxed"]


def test_a_need_whose_provider_is_off_is_refused(tmp_path: Path, plugin: Callable[..., str]) -> None:
    off = plugin("off", Wiring(provides=("crypto",)), lambda ctx: None)
    needy = plugin("needy", Wiring(needs=("crypto",)))
    with pytest.raises(CompositionError, match=f"^{needy} needs service\\(s\\) crypto, but the capability"):
        create_app(_settings(tmp_path), [needy, off])


def test_undeclared_or_doubly_provided_services_are_refused(tmp_path: Path, plugin: Callable[..., str]) -> None:
    def sneaky(ctx: AppContext) -> Double:
        ctx.services.secrets = object()  # type: ignore[assignment]
        return Double("sneaky")

    mod = plugin("sneaky", None, sneaky)
    with pytest.raises(CompositionError, match=f"^{mod} set services secrets without declaring them"):
        create_app(_settings(tmp_path), [mod])
    one = plugin("one", Wiring(provides=("crypto",)))
    two = plugin("two", Wiring(provides=("crypto",)))
    with pytest.raises(CompositionError, match=f"^service 'crypto' is provided by both {one} and {two}$"):
        create_app(_settings(tmp_path), [one, two])
    with pytest.raises(ValueError, match="not a Services field: embedder"):
        Wiring(uses=("embedder",))


def test_services_are_typed_fields_not_a_string_lookup() -> None:
    ctx = AppContext(settings=None, state=None)  # type: ignore[arg-type]
    assert isinstance(ctx.services, Services)
    assert not hasattr(ctx, "get") and not hasattr(ctx, "provide")
    assert ctx.services.crypto is ctx.services.secrets is ctx.services.local_embedder is None


def test_one_registry_for_app_and_cli() -> None:
    assert cli.CLI_MODULES is CLI_MODULES
    assert CAPABILITY_MODULES == [e.module for e in REGISTRY if e.module]
    assert CLI_MODULES == [e.cli for e in REGISTRY if e.cli]
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    for e in REGISTRY:
        assert e.module in (None, f"xcstack.{e.name}.capability") and e.cli in (None, f"xcstack.{e.name}.cli")


def test_full_app_gives_embeddings_to_the_gateway_and_local_models_to_it(tmp_path: Path) -> None:
    from xcstack.gateway.capability import GatewayCapability
    from xcstack.inference.capability import InferenceCapability

    upstream = {"name": "u", "base_url": "http://127.0.0.1:9/v1", "models": ["m"]}
    settings = load_settings(None, data_dir=tmp_path, security={"enabled": False}, inference={"mode": "inline"},
                             gateway={"upstreams": [upstream]})
    xc = create_app(settings, ["xcstack.gateway.capability", "xcstack.inference.capability"]).state.xc
    gateway = next(c for c in xc.capabilities if isinstance(c, GatewayCapability))
    inference = next(c for c in xc.capabilities if isinstance(c, InferenceCapability))
    assert xc.services.local_embedder is inference.models
    assert gateway.service.local.embedder is inference.models  # typed: the gateway holds the LocalEmbedder itself
    assert "/v1/embeddings" not in {getattr(r, "path", "") for r in inference.routes()}
    alone = create_app(settings, ["xcstack.inference.capability"]).state.xc.capabilities[0]
    assert "/v1/embeddings" in {getattr(r, "path", "") for r in alone.routes()}


def test_supervisor_passes_child_env_and_leaves_its_own_environment_alone(tmp_path: Path) -> None:
    from xcstack.inference.capability import UNAVAILABLE_ENV
    from xcstack.inference.worker import COUNT_ENV
    from xcstack.supervisor import Supervisor

    settings = load_settings(None, data_dir=tmp_path, inference={"mode": "process", "workers": 2},
                             server={"workers": 2})
    before = dict(os.environ)
    sup = Supervisor(settings, ["xcstack.inference.capability"])
    sup.plan_children()
    assert dict(os.environ) == before
    assert sup.side == []  # no model in the repository: no idle model worker
    assert [c.env for c in sup.http] == [{COUNT_ENV: "0", UNAVAILABLE_ENV: ""}] * 2
