"""`/openapi.json` and the API reference page at `/docs`, served by xcstack itself.

The page is Swagger UI from the `swagger-ui-py` package's static files: no CDN, no network at run
time, and no inline script (the page's Content-Security-Policy allows only same-origin scripts).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import ApiDoc, api_for
from xcstack.errors import CoreCode, NotFound
from xcstack.httputil import dumps
from xcstack.security.guard import public

#: the files of Swagger UI the page loads, served under /docs/, with their media types
ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
          "swagger-ui-standalone-preset.js": "text/javascript", "favicon-32x32.png": "image/png"}
PATHS = ("/openapi.json", "/docs", "/docs/init.js", *(f"/docs/{a}" for a in ASSETS))

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xcstack API reference</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/swagger-ui.css"><link rel="icon" href="/docs/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script><script src="/docs/swagger-ui-standalone-preset.js"></script>
<script src="/docs/init.js"></script></body></html>
"""

INIT_JS = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "BaseLayout"
  });
});
"""


def swagger_dir() -> Path | None:
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def build_routes(document: Callable[[], dict[str, Any]]) -> list[BaseRoute]:
    """The reference routes; `document()` builds the OpenAPI document (called once, then cached)."""
    cache: list[bytes] = []
    static = swagger_dir()
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}

    @public
    async def openapi_json(request: Request) -> Response:
        if not cache:
            cache.append(dumps(document()))
        return Response(cache[0], media_type="application/json", headers={"Cache-Control": "no-cache"})

    @public
    async def page(request: Request) -> Response:
        if static is None:
            raise NotFound("the API reference page needs the swagger-ui-py package; /openapi.json is served",
                           code=CoreCode.NOT_FOUND)
        return Response(PAGE, media_type="text/html; charset=utf-8", headers=headers)

    @public
    async def init_js(request: Request) -> Response:
        return Response(INIT_JS, media_type="text/javascript", headers=headers)

    def asset(name: str) -> Callable[[Request], Any]:
        @public
        async def serve(request: Request) -> Response:
            if static is None:
                raise NotFound(f"no {name}: the swagger-ui-py package is not installed", code=CoreCode.NOT_FOUND)
            return FileResponse(static / name, media_type=ASSETS[name],
                                headers={**headers, "Cache-Control": "max-age=86400"})

        return serve

    routes: list[BaseRoute] = [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", page, methods=["GET"]),
        Route("/docs/init.js", init_js, methods=["GET"]),
    ]
    routes += [Route(f"/docs/{a}", asset(a), methods=["GET"]) for a in ASSETS]
    media = {"/docs": "text/html", "/docs/init.js": "text/javascript",
             **{f"/docs/{a}": kind for a, kind in ASSETS.items()}}
    for route in routes:
        assert isinstance(route, Route)
        is_doc = route.path == "/openapi.json"
        api_for("GET", route.endpoint, ApiDoc(
            "This OpenAPI 3.1 document" if is_doc else f"API reference page ({route.path})",
            response={"type": "object"} if is_doc else None,
            streams={} if is_doc else {media[route.path]: "the reference page or one of its assets"},
            errors=(404,), tag="core"))
    return routes


def public_paths() -> Sequence[str]:
    return PATHS
