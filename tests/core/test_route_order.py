"""The data-plane routes are matched first (app.hot_first): Starlette tries routes in order, and the chat
route used to sit behind every administrative route."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route

from xcstack.app import HOT_PATHS, hot_first


async def _ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_hot_paths_first_in_their_order_rest_unchanged() -> None:
    a = Route("/healthz", _ok)
    b = Route("/v1/security/users", _ok)
    chat_get = Route("/v1/chat/completions", _ok, methods=["GET"])
    m = Mount("/console", routes=[])
    emb = Route("/v1/embeddings", _ok, methods=["POST"])
    chat_post = Route("/v1/chat/completions", _ok, methods=["POST"])
    c = Route("/v1/db/{database}/{query}", _ok)
    routes: list[BaseRoute] = [a, b, chat_get, m, emb, chat_post, c]
    out = hot_first(routes)
    assert out == [chat_get, chat_post, emb, a, b, m, c]  # same-path routes keep their relative order
    assert len(out) == len(routes) and set(map(id, out)) == set(map(id, routes))
    assert HOT_PATHS[0] == "/v1/chat/completions"


def test_the_built_app_matches_chat_first(tmp_path: Path) -> None:
    from xcstack.app import create_app
    from xcstack.config import load_settings

    settings = load_settings(data_dir=tmp_path, security={"enabled": False})
    app = create_app(settings, ["xcstack.crypto.capability", "xcstack.gateway.capability"])
    first = app.routes[0]
    assert isinstance(first, Route) and first.path == "/v1/chat/completions", [getattr(r, "path", r)
                                                                                for r in app.routes[:3]]
