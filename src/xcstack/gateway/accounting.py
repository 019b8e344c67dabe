"""What a call cost: request counts, time to first token, generation time and tokens per key and
model, and the caller's token budget corrected from the estimate charged at admission to the usage
the upstream reported.

Per-request metric updates go through cached labelled children (`Children`, and `metrics.Keyed`
for the per-key series, whose key label is bounded), because `labels()` costs more than the update.
"""

from __future__ import annotations

from typing import Any

from xcstack.gateway import metrics
from xcstack.gateway.prepare import Prepared
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.httputil import loads
from xcstack.observability.metrics import Children


class Accounting:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._requests = Children(metrics.REQUESTS)
        self._ttft = Children(metrics.TTFT)

    def count(self, endpoint: str, model: str, status: int) -> None:
        """One answered (or abandoned: 499) request."""
        self._requests(endpoint, model, str(status)).inc()

    def first_token(self, pr: Prepared, seconds: float) -> None:
        self._ttft(pr.model).observe(seconds)
        metrics.KEY_TTFT.labels(pr.key, pr.model).observe(seconds)

    async def usage(self, pr: Prepared, usage: dict[str, Any], seconds: float) -> None:
        """Record a call's usage: generation time (`seconds`: streams after the first token; unary the
        whole upstream call, so per-key tokens/s = completion tokens / generation seconds holds for both),
        tokens, and the difference to the admission estimate charged to the key's token limit."""
        ct = usage.get("completion_tokens")
        if isinstance(ct, int) and ct > 0 and seconds > 0:
            metrics.TOKENS_PER_S.labels(pr.model).observe(ct / seconds)
            metrics.KEY_GENERATION.labels(pr.key, pr.model).observe(seconds)
        pt = usage.get("prompt_tokens") or 0
        ct = usage.get("completion_tokens") or 0
        if isinstance(pt, int) and isinstance(ct, int):
            if pr.usage is not None:  # the usage capability's ticket: what the ledger and quotas charge
                pr.usage.record_usage(pt, ct, estimated=bool(usage.get("xc_estimated")))
            metrics.TOKENS.labels(pr.key, pr.model, "prompt").inc(pt)
            if ct:
                metrics.TOKENS.labels(pr.key, pr.model, "completion").inc(ct)
            total = usage.get("total_tokens")
            actual = total if isinstance(total, int) else pt + ct
            await self.limiter.charge(pr.key, actual - pr.estimate)

    async def unary(self, pr: Prepared, payload: bytes, seconds: float) -> None:
        """The usage of a non-streamed answer, if it reports one."""
        if b'"usage"' not in payload:
            return
        try:
            usage = loads(payload).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            await self.usage(pr, usage, seconds)

    async def stream(self, pr: Prepared, usage: dict[str, Any] | None, events: int, seconds: float) -> None:
        """The usage of a stream (also one the client left: the upstream did the work so far); without
        a usage chunk, each data event counts as one completion token."""
        if usage is None and events:
            usage = {"prompt_tokens": pr.estimate, "completion_tokens": events, "total_tokens": pr.estimate + events,
                     "xc_estimated": True}
        if usage is not None:
            await self.usage(pr, usage, seconds)
