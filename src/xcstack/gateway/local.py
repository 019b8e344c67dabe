"""`/v1/embeddings` for a model no upstream serves: handed to the inference capability in this process.

`LocalEmbedder.embeddings_body` is the inference capability's whole exchange (request dict -> response
dict), put there by `gateway/capability.py` from `Services.local_embedder`.
"""

from __future__ import annotations

from typing import Any

from xcstack.capability import LocalEmbedder
from xcstack.disconnect import CancelOnDisconnect, ClientDisconnected
from xcstack.gateway.asgi import ClientGone, send_json
from xcstack.gateway.prepare import Prepared
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.gateway.types import Receive, Send
from xcstack.httputil import dumps


class LocalEmbeddings:
    def __init__(self, embedder: LocalEmbedder | None, limiter: RateLimiter) -> None:
        self.embedder = embedder
        self.limiter = limiter

    @property
    def available(self) -> bool:
        """Whether this process can embed locally (the inference capability is on)."""
        return self.embedder is not None

    async def serve(self, pr: Prepared, send: Send, receive: Receive) -> int:
        """Answer a validated request. A client that leaves while its rows wait for a batch has them
        withdrawn (and its estimate refunded: not served, not counted)."""
        await self.limiter.check(pr.key, pr.estimate)
        try:
            async with CancelOnDisconnect(receive):
                out = await self.embed(pr.data, pr.model)
        except ClientDisconnected:
            await self.limiter.refund(pr.key, pr.estimate)
            raise ClientGone() from None
        spent = out.get("usage") if isinstance(out, dict) else None
        if isinstance(spent, dict) and isinstance(spent.get("total_tokens"), int):
            await self.limiter.charge(pr.key, spent["total_tokens"] - pr.estimate)
            if pr.usage is not None:  # the local tokenizer's count: exact, not an estimate
                pt = spent.get("prompt_tokens")
                pr.usage.record_usage(pt if isinstance(pt, int) else spent["total_tokens"], 0)
        await send_json(send, 200, dumps(out))
        return 200

    async def embed(self, data: dict[str, Any], model: str) -> Any:
        if self.embedder is None:
            raise RuntimeError("no local models in this process")  # callers check `available` first
        return await self.embedder.embeddings_body(data)
