"""How a capability (gateway, inference, vector, db, crypto, security, ...) plugs into xcstack.

A capability package exposes a module `xcstack.<name>.capability` with:

- `create(ctx: AppContext) -> Capability | None` — build the in-worker service (None: disabled);
- optionally `side_processes(settings, plan) -> list[SideProcessSpec]` — processes the supervisor
  starts next to the http workers (model workers, the HSM owner);
- optionally `register_cli(subparsers)` — its `xcstack <verb>` commands.

`app.py` and `supervisor.py` are the only places that know the list (`CAPABILITY_MODULES`).
Capabilities talk to each other only through services published on the context
(`ctx.provide("embedder", fn)` / `ctx.get("embedder")`), never through each other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from xcstack.config import Settings
    from xcstack.state.store import StateStore

# Order matters: a capability may `get` services that an earlier one `provide`d at create time.
CAPABILITY_MODULES: list[str] = [
    "xcstack.crypto.capability",
    "xcstack.security.capability",
    "xcstack.gateway.capability",
    "xcstack.db.capability",
    "xcstack.inference.capability",
    "xcstack.vector.capability",
]


@runtime_checkable
class Capability(Protocol):
    name: str

    def routes(self) -> Sequence[BaseRoute]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        """(ready?, detail) for /readyz; called often, must be cheap and bounded in time."""
        ...


@dataclass
class AppContext:
    """What every capability receives: settings, the state store, and shared services."""

    settings: Settings
    state: StateStore
    services: dict[str, Any] = field(default_factory=dict)

    def provide(self, name: str, service: Any) -> None:
        if name in self.services:
            raise RuntimeError(f"service {name!r} provided twice")
        self.services[name] = service

    def get(self, name: str, default: Any = None) -> Any:
        return self.services.get(name, default)


@dataclass(frozen=True)
class SideProcessSpec:
    """A side process the supervisor runs: `target` is 'module:function', called as
    `function(settings, index)` in a fresh interpreter, pinned to `cpus[index]` when given."""

    name: str
    target: str
    instances: int = 1
    cpus: Sequence[Sequence[int]] = ()
    env: dict[str, str] = field(default_factory=dict)
    ready_check: Callable[[int], bool] | None = None
