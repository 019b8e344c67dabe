"""The local models as one service: the repository, the backend that runs them and the loop pacer.

The inference routes use it, and other capabilities get it as `Services.local_embedder`
(`capability.LocalEmbedder`): `embed(model, texts)` for vectors, `embeddings_body(body)` for the
whole OpenAI `/v1/embeddings` exchange (how the gateway's `/v1/embeddings` reaches local models),
`model_names()` for `/v1/models`. Errors are XCError: 404 unknown model, 503 retriable overload or
worker down, 504 timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xcstack.errors import BadRequest, CoreCode, NotFound, Overloaded
from xcstack.inference import metrics
from xcstack.inference.protocol import InferenceCode

if TYPE_CHECKING:  # numpy loads with the backend, when the capability is on
    import numpy as np

    from xcstack.inference.client import Backend
    from xcstack.inference.pacing import LoopPacer
    from xcstack.inference.protocol import EmbeddingsRequest
    from xcstack.inference.repository import ModelRepository
    from xcstack.inference.settings import InferenceSettings

EMBED_CHUNK = 512  # texts per backend call for `embed`: internal callers (indexing) may pass thousands


class LocalModels:
    def __init__(self, settings: InferenceSettings, repo: ModelRepository, backend: Backend,
                 pacer: LoopPacer | None) -> None:
        self.settings = settings
        self.repo = repo
        self.backend = backend
        self.pacer = pacer

    async def ready(self) -> tuple[bool, str]:
        """Not ready without a model: an enabled inference capability that cannot embed anything would
        send a load balancer traffic it must fail. A node meant to run without local models sets
        [inference] enabled = false."""
        if not self.repo.models():
            broken = "; ".join(e.error for e in self.repo.entries.values() if e.error)
            return False, (f"degraded: no model in {self.repo.root}" + (f" that loads ({broken})" if broken else "")
                           + "; run `xcstack model import-default`")  # fmt: skip
        return await self.backend.ready()

    async def turn(self) -> None:
        """Yield the loop when this turn used its budget (no-op without a pacer)."""
        if self.pacer is not None:
            await self.pacer.turn()

    def embedding_model(self, name: str | None) -> str:
        model = name or self.settings.default_embedding_model
        entry = self.repo.get(model)
        if entry is None:
            raise NotFound(f"model {model!r} is not in the model repository", code=CoreCode.MODEL_NOT_FOUND)
        if entry.config is None:
            raise Overloaded(f"model {model!r} is unavailable: {entry.error}", code=InferenceCode.MODEL_UNAVAILABLE)
        if entry.config.kind != "embedding":
            raise NotFound(f"model {model!r} is not an embedding model", code=CoreCode.MODEL_NOT_FOUND)
        return model

    async def embed(self, model: str | None, inputs: list[str],
                    input_type: str | None = None) -> tuple[np.ndarray, dict[str, int]]:
        """Texts -> unit-norm float32 vectors [n, dims] and usage. The model's prefix for `input_type`
        (query | document | passage; None: its default_input_type) goes before each text: e5-family
        models give poor vectors for text without the prefix they were trained with."""
        name = self.embedding_model(model)
        prefix = self.repo.get(name).config.prefix_for(input_type)  # type: ignore[union-attr]
        if prefix:
            inputs = [prefix + t for t in inputs]
        try:
            if len(inputs) <= EMBED_CHUNK:
                vectors, tokens = await self.backend.embed(name, inputs, self.settings.request_timeout_s)
            else:  # chunks keep each call within the queue
                parts: list[np.ndarray] = []
                tokens = 0
                for i in range(0, len(inputs), EMBED_CHUNK):
                    v, t = await self.backend.embed(name, inputs[i : i + EMBED_CHUNK], self.settings.request_timeout_s)
                    parts.append(v)
                    tokens += t
                import numpy as np

                vectors = np.concatenate(parts)
        except Exception:
            metrics.count_request(name, "embed", "error")
            raise
        metrics.count_request(name, "embed", "ok")
        return vectors, {"prompt_tokens": tokens, "total_tokens": tokens}

    async def embed_request(self, name: str, req: EmbeddingsRequest) -> tuple[np.ndarray, dict[str, int]]:
        from xcstack.inference.protocol import texts_of

        texts = texts_of(req, self.settings.max_inputs, self.settings.max_input_chars)
        model = self.embedding_model(name)
        dims = self.repo.get(model).config.dimensions  # type: ignore[union-attr]
        if req.dimensions is not None and dims is not None and req.dimensions != dims:
            raise BadRequest(f"dimensions: model {model} produces {dims}-dimensional vectors only",
                             code=CoreCode.INVALID_PARAMETER, param="dimensions")
        return await self.embed(model, texts, req.input_type)

    async def embeddings_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The whole OpenAI /v1/embeddings exchange for a local model: request dict -> response dict
        (validation, limits, encoding_format, usage); raises XCError. Paced like the inference route."""
        from xcstack.httputil import parse_model
        from xcstack.inference.protocol import EmbeddingsRequest, embeddings_response

        await self.turn()
        req = parse_model(body, EmbeddingsRequest)
        name = req.model or self.settings.default_embedding_model
        vectors, usage = await self.embed_request(name, req)
        await self.turn()
        return embeddings_response(name, vectors, usage["prompt_tokens"], req.encoding_format)

    def model_names(self) -> list[str]:
        return [m.name for m in self.repo.models()]

    # --- rerank (cross-encoders) ------------------------------------------------------------------
    def rerank_models(self) -> list[str]:
        """The loadable models of kind `rerank`, by name."""
        return sorted(m.name for m in self.repo.models() if m.kind == "rerank")

    async def rerank(self, model: str, query: str, documents: list[str]) -> tuple[np.ndarray, dict[str, int]]:
        """Relevance of each document to the query with the cross-encoder `model`: float32 scores [n] in
        (0, 1) (sigmoid of one logit, or the probability of label 1 of two), and usage. Paced like embed."""
        entry = self.repo.get(model)
        if entry is None or (entry.config is not None and entry.config.kind != "rerank"):
            raise NotFound(f"model {model!r} is not a rerank model in the model repository",
                           code=CoreCode.MODEL_NOT_FOUND)
        if entry.config is None:
            raise Overloaded(f"model {model!r} is unavailable: {entry.error}", code=InferenceCode.MODEL_UNAVAILABLE)
        await self.turn()
        try:
            scores, tokens = await self.backend.rerank(model, query, documents, self.settings.request_timeout_s)
        except Exception:
            metrics.count_request(model, "rerank", "error")
            raise
        metrics.count_request(model, "rerank", "ok")
        await self.turn()
        return scores, {"prompt_tokens": tokens, "total_tokens": tokens}
