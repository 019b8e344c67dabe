"""How a capability (gateway, inference, vector, db, crypto, security, ...) plugs into xcstack.

A capability package exposes a module `xcstack.<name>.capability` with:

- `create(ctx: AppContext) -> Capability | None` — build the in-worker service (None: disabled);
- optionally `WIRING = Wiring(provides=..., needs=..., uses=...)` — which `Services` fields it sets
  in `create` and which it reads (default: none);
- optionally `side_processes(settings, plan) -> list[SideProcessSpec]` — processes the supervisor
  starts next to the http workers (model workers, the HSM owner);
- optionally `child_env(settings, plan) -> dict[str, str]` — variables the supervisor puts into the
  environment of every child it starts (http workers and side processes), instead of a capability
  writing `os.environ` itself.

Its CLI module (`xcstack.<name>.cli`, `register(subparsers)`) is named in the same table, `REGISTRY`,
which is the one list of capabilities the app, the supervisor and the CLI read.

Capabilities talk to each other only through the typed `Services` on the context, never through each
other's internals. `app.py` creates them in an order where every provider comes before its users and
refuses, at start, a cycle or a need nobody provides (see `app.order_modules`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # kept out of the import: the CLI reads REGISTRY and must stay light
    from starlette.routing import BaseRoute

    from xcstack.config import Settings
    from xcstack.crypto.client import CryptoClient
    from xcstack.gateway.settings import UpstreamSettings
    from xcstack.safety.service import SafetyService
    from xcstack.security.secrets import SecretStore
    from xcstack.state.store import StateStore


@dataclass(frozen=True)
class Entry:
    """One capability: its in-worker module and its CLI module (either may be absent)."""

    name: str
    module: str | None
    cli: str | None


REGISTRY: tuple[Entry, ...] = (
    Entry("crypto", "xcstack.crypto.capability", "xcstack.crypto.cli"),
    Entry("security", "xcstack.security.capability", "xcstack.security.cli"),
    Entry("safety", "xcstack.safety.capability", "xcstack.safety.cli"),
    Entry("gateway", "xcstack.gateway.capability", "xcstack.gateway.cli"),
    Entry("db", "xcstack.db.capability", "xcstack.db.cli"),
    Entry("inference", "xcstack.inference.capability", "xcstack.inference.cli"),
    Entry("llm", "xcstack.llm.capability", "xcstack.llm.cli"),
    Entry("vector", "xcstack.vector.capability", None),
    Entry("usage", "xcstack.usage.capability", "xcstack.usage.cli"),
    Entry("console", "xcstack.console.capability", None),
    Entry("platform", None, "xcstack.platform.cli"),
    Entry("supply", None, "xcstack.supply.cli"),
)
CAPABILITY_MODULES: list[str] = [e.module for e in REGISTRY if e.module]
CLI_MODULES: list[str] = [e.cli for e in REGISTRY if e.cli]


@runtime_checkable
class Capability(Protocol):
    name: str

    def routes(self) -> Sequence[BaseRoute]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> tuple[bool, str]:
        """(ready?, detail) for /readyz; called often, must be cheap and bounded in time."""
        ...


class LocalEmbedder(Protocol):
    """The inference capability's local models, as the gateway and the vector capability use them."""

    async def embed(self, model: str | None, inputs: list[str],
                    input_type: str | None = None) -> tuple[Any, dict[str, int]]:
        """Texts -> (float32 vectors [n, dims], usage); raises XCError (404, 503, 504). `input_type`
        (query | document): the model's prefix for that kind of text (None: its default)."""
        ...

    async def embeddings_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The whole OpenAI /v1/embeddings exchange: request dict -> response dict."""
        ...

    def model_names(self) -> list[str]: ...

    def rerank_models(self) -> list[str]:
        """The local cross-encoders (models of kind `rerank`)."""
        ...

    async def rerank(self, model: str, query: str, documents: list[str]) -> tuple[Any, dict[str, int]]:
        """Relevance scores (float32 [n], in (0, 1)) of `documents` to `query` and usage; raises XCError."""
        ...


class GroupDirectory(Protocol):
    """The security capability's groups and users, as the usage capability checks the names quotas use."""

    async def group_exists(self, name: str) -> bool: ...

    async def user_id(self, name: str) -> str | None:
        """The id of the user called `name`, None when there is none."""
        ...


class UsageGovernor(Protocol):
    """The usage capability's quotas and ledger, as the gateway calls them around each request."""

    async def reserve(self, scope: Any, endpoint: str, model: str, est_in: int, max_tokens: int | None) -> Any:
        """A ticket for the call (filled in as it runs); raises 429 `quota_exceeded` (or 503 when the
        shared counters are down and `on_counter_failure = "closed"`)."""
        ...

    async def settle(self, ticket: Any, status: int) -> None:
        """Charge what the call used and write its ledger record."""
        ...

    async def cancel(self, ticket: Any, status: int) -> None:
        """The call was not served: give its reservation back (still one ledger record)."""
        ...


class LocalLLM(Protocol):
    """The llm capability's local chat model, as the gateway routes to it: an upstream entry generated for
    its worker (address, key, slots, context)."""

    def upstream(self) -> UpstreamSettings: ...


@dataclass
class Services:
    """What capabilities give each other. A field is None when the capability providing it is off
    (or not in the app), so every user says what it does without it."""

    crypto: CryptoClient | None = None  # crypto: keys in the HSM owner (or in process, `access = "direct"`)
    secrets: SecretStore | None = None  # security: `secret:NAME` references in config (after its start)
    local_embedder: LocalEmbedder | None = None  # inference: the local models
    safety: SafetyService | None = None  # safety: content filters, evidence and labels (gateway)
    local_llm: LocalLLM | None = None  # llm: the local chat model (a llama.cpp worker), routed by the gateway
    groups: GroupDirectory | None = None  # security: group and user look-ups
    usage: UsageGovernor | None = None  # usage: quotas and the usage ledger


SERVICE_NAMES = frozenset(f.name for f in fields(Services))


@dataclass(frozen=True)
class Wiring:
    """A capability module's declaration: the `Services` fields its `create` sets (`provides`), those
    it cannot work without (`needs`: the app refuses to start when no capability in it provides one,
    or when the provider is off) and those it uses when present (`uses`). Both order creation."""

    provides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted({*self.provides, *self.needs, *self.uses} - SERVICE_NAMES)
        if unknown:
            raise ValueError(f"not a Services field: {', '.join(unknown)} (known: {', '.join(sorted(SERVICE_NAMES))})")


@dataclass
class AppContext:
    """What every capability receives: settings, the state store, the typed services, and who serves
    `/v1/embeddings` (decided by `app.py`: the gateway when it is on, else the inference capability)."""

    settings: Settings
    state: StateStore
    services: Services = field(default_factory=Services)
    embeddings_owner: str = "inference"


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
