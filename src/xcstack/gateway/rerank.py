"""`POST /v1/rerank` (alias `/rerank`): scores documents against a query, answered in the shape vLLM, Jina
and Cohere clients read (`results` sorted best first, `index`, `relevance_score`, `document.text`).

Who answers a model, in this order:
1. a local model of kind `rerank` (a cross-encoder in the model workers): `method: cross-encoder`;
2. an upstream whose config lists the model: routed and failed over like chat by `service.py` (the body
   sent has `documents` as plain strings, which every server takes; the answer gets `method`);
3. a local embedding model, where no cross-encoder serves the name: cosine of the query's and each
   document's embedding (`method: bi-encoder`; with e5-style prefixes, the query as a query and the
   documents as passages). Never presented as a cross-encoder.

Without `model`: `gateway.rerank.default_model`, else the first local rerank model, else the default
embedding model (bi-encoder). Limits (`gateway.rerank`) give 400 `too_many_documents`,
`document_too_long`, `query_too_long`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from xcstack.capability import LocalEmbedder
from xcstack.disconnect import CancelOnDisconnect, ClientDisconnected
from xcstack.errors import BadRequest
from xcstack.gateway import protocol as p
from xcstack.gateway.asgi import ClientGone, send_json
from xcstack.gateway.prepare import RERANK, Prepared
from xcstack.gateway.protocol import GatewayCode
from xcstack.gateway.ratelimit import RateLimiter
from xcstack.gateway.settings import RerankSettings
from xcstack.gateway.upstream import Router
from xcstack.httputil import dumps, loads, parse_model

Method = Literal["cross-encoder", "bi-encoder"]


class Reranker:
    def __init__(self, settings: RerankSettings, router: Router, local: LocalEmbedder | None,
                 limiter: RateLimiter, default_embedding_model: str | None) -> None:
        self.settings = settings
        self.router = router
        self.local = local
        self.limiter = limiter
        self.default_embedding_model = default_embedding_model

    # -- validation ---------------------------------------------------------------------------------
    def prepare(self, data: dict[str, Any], key: str) -> Prepared:
        """Validate a request (strict types, then the limits), fill in the model, and keep the body an
        upstream gets: `documents` as strings, `model` named."""
        req = parse_model(data, p.RerankRequest)
        s = self.settings
        if len(req.query) > s.max_query_chars:
            raise BadRequest(f"query: {len(req.query)} characters; the limit is {s.max_query_chars}",
                             code=GatewayCode.QUERY_TOO_LONG, param="query")
        if len(req.documents) > s.max_documents:
            raise BadRequest(f"documents: {len(req.documents)} items; the limit is {s.max_documents}",
                             code=GatewayCode.TOO_MANY_DOCUMENTS, param="documents")
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        for i, d in enumerate(docs):
            if len(d) > s.max_document_chars:
                raise BadRequest(f"documents[{i}]: {len(d)} characters; the limit is {s.max_document_chars}",
                                 code=GatewayCode.DOCUMENT_TOO_LONG, param=f"documents[{i}]")
        model = req.model or self.default_model()
        body = {**data, "model": model, "documents": docs}
        # pairs repeat the query for each document
        estimate = max(1, (len(req.query) * len(docs) + sum(len(d) for d in docs)) // 3)
        return Prepared(RERANK, body, dumps(body), model, False, False, key, estimate)

    def default_model(self) -> str:
        if self.settings.default_model is not None:
            return self.settings.default_model
        if self.local is not None:
            ranked = self.local.rerank_models()
            if ranked:
                return ranked[0]
            if self.default_embedding_model is not None:
                return self.default_embedding_model
        raise BadRequest("model: required (no rerank or embedding model serves a request without one here)",
                         code=GatewayCode.MODEL_REQUIRED, param="model")

    def local_method(self, model: str) -> Method | None:
        """How this process answers `model` itself (None: an upstream does, or nobody: 404 after the
        permission check)."""
        if self.local is None:
            return None
        if model in self.local.rerank_models():
            return "cross-encoder"
        if not self.router.has(model) and model in self.local.model_names():
            return "bi-encoder"  # an embedding model (any other kind: the embedder answers 404)
        return None

    # -- local answers -------------------------------------------------------------------------------
    async def serve(self, pr: Prepared, method: Method, send: Any, receive: Any) -> int:
        """Answer locally. A client that leaves while its rows wait for a batch has them withdrawn (and
        its estimate refunded: not served, not counted)."""
        await self.limiter.check(pr.key, pr.estimate)
        try:
            async with CancelOnDisconnect(receive):
                out = await self.answer(pr, method)
        except ClientDisconnected:
            await self.limiter.refund(pr.key, pr.estimate)
            raise ClientGone() from None
        await self.limiter.charge(pr.key, out["usage"]["total_tokens"] - pr.estimate)
        if pr.usage is not None:  # the usage capability's ticket: the local tokenizer's count, exact
            pr.usage.record_usage(out["usage"]["prompt_tokens"], 0)
        await send_json(send, 200, dumps(out))
        return 200

    async def answer(self, pr: Prepared, method: Method) -> dict[str, Any]:
        assert self.local is not None
        query: str = pr.data["query"]
        docs: list[str] = pr.data["documents"]
        if method == "cross-encoder":
            scores, usage = await self.local.rerank(pr.model, query, docs)
            values = [float(x) for x in scores]
        else:
            (q, uq), (d, ud) = await asyncio.gather(  # submitted together: they can share a batch
                self.local.embed(pr.model, [query], "query"), self.local.embed(pr.model, docs, "document"))
            values = [float(x) for x in d @ q[0]]  # unit-norm rows: cosine similarity
            usage = {"prompt_tokens": uq["prompt_tokens"] + ud["prompt_tokens"],
                     "total_tokens": uq["total_tokens"] + ud["total_tokens"]}
        return response(pr, values, usage, method)


def response(pr: Prepared, scores: list[float], usage: dict[str, int], method: Method) -> dict[str, Any]:
    """The answer: results best first (ties in request order), cut to `top_n`, with the documents unless
    `return_documents` is false."""
    docs: list[str] = pr.data["documents"]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top_n = pr.data.get("top_n")
    if isinstance(top_n, int):
        order = order[:top_n]
    with_docs = pr.data.get("return_documents") is not False
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": docs[i]}} if with_docs else {})}
               for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": pr.model, "results": results,
            "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"]},
            "method": method}


def upstream_answer(pr: Prepared, payload: bytes) -> bytes:
    """An upstream's successful answer with `method: cross-encoder` added (rerank servers run
    cross-encoders) and, with `return_documents: false`, without the documents vLLM always sends;
    anything that is not a results object is relayed untouched."""
    try:
        out = loads(payload)
    except ValueError:
        return payload
    if not isinstance(out, dict) or not isinstance(out.get("results"), list):
        return payload
    out.setdefault("method", "cross-encoder")
    if pr.data.get("return_documents") is False:
        for r in out["results"]:
            if isinstance(r, dict):
                r.pop("document", None)
    return dumps(out)
