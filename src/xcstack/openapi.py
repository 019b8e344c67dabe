"""The OpenAPI 3.1 document of a running app, generated from its routes.

Every mounted route contributes its path, methods and path parameters; `@api` marks (apidoc.py) add
the request and response schemas, taken from the pydantic models the route itself parses with, and
`@requires` marks the permission. Error responses share one schema whose `code` lists every stable
code of the error catalogue (the `StrEnum`s of `ERROR_CATALOGUE`, which every raise site uses).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.convertors import FloatConvertor, IntegerConvertor
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import ApiDoc, Schema, doc_of
from xcstack.crypto.protocol import CryptoCode
from xcstack.db.protocol import DbCode
from xcstack.errors import CoreCode
from xcstack.gateway.protocol import GatewayCode
from xcstack.inference.protocol import InferenceCode
from xcstack.security.guard import permission_of
from xcstack.security.protocol import SecurityCode
from xcstack.usage.protocol import UsageCode
from xcstack.vector.protocol import VectorCode

REF = "#/components/schemas/{model}"
COMMON_ERRORS = (400, 401, 403, 413, 429, 503)
#: statuses the middleware (authentication, RBAC, body and header limits, rate limits) may answer before a
#: route runs, always in xcstack's error shape: a KServe operation answers them in either shape
BEFORE_ROUTE = (401, 403, 408, 413, 414, 429, 431, 503)
_STATUS_TEXT = {
    400: "Bad request: the body or a parameter is invalid",
    401: "Authentication required or failed",
    403: "Permission denied (RBAC)",
    404: "Not found",
    405: "Method not allowed",
    408: "The client did not send the request in time",
    409: "Conflict",
    413: "Payload too large",
    414: "URI too long",
    429: "Rate limited or quota exceeded (`Retry-After`)",
    431: "Request header fields too large",
    499: "Client closed the request",
    500: "Internal error (the request id is in the message)",
    502: "Upstream error",
    503: "Overloaded or a backend is unavailable (`Retry-After`)",
    504: "Timed out",
}


#: The error catalogue: every stable code a response can carry is a member of exactly one of these
#: (core codes in `errors.py`, one enum per capability in its `protocol.py`).
ERROR_CATALOGUE: tuple[type[StrEnum], ...] = (CoreCode, GatewayCode, InferenceCode, VectorCode, DbCode, CryptoCode,
                                              SecurityCode, UsageCode)


@functools.cache
def error_codes() -> tuple[str, ...]:
    """Every stable error code, read from the catalogue enums: the `Error.code` enum of the document."""
    return tuple(sorted({member.value for enum in ERROR_CATALOGUE for member in enum}))


def error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "code", "message"],
                "properties": {
                    "type": {"type": "string", "description": "OpenAI-style error class"},
                    "code": {"type": "string", "enum": list(error_codes()),
                             "description": "stable code a client can switch on"},
                    "message": {"type": "string", "description": "for humans; may change"},
                    "param": {"type": ["string", "null"], "description": "the offending field, when one is"},
                },
            }
        },
    }


def kserve_error_schema() -> dict[str, Any]:
    """KServe v2 clients (tritonclient) read `error` as the message; xcstack adds its code and type."""
    inner = error_schema()["properties"]["error"]["properties"]
    return {
        "type": "object",
        "required": ["error", "code", "type"],
        "properties": {"error": {"type": "string", "description": "the message (KServe v2)"},
                       "code": inner["code"], "type": inner["type"]},
    }


class _Models:
    """Collects the pydantic models of all operations, then renders them with shared definitions."""

    def __init__(self) -> None:
        self.wanted: list[tuple[type[BaseModel], Any]] = []

    def ref(self, schema: Schema, mode: str) -> dict[str, Any]:
        if isinstance(schema, Mapping):
            return dict(schema)
        self.wanted.append((schema, mode))
        return {"$ref": f"@{mode}:{schema.__module__}.{schema.__qualname__}"}

    def render(self) -> tuple[dict[str, str], dict[str, Any]]:
        if not self.wanted:
            return {}, {}
        unique = list(dict.fromkeys(self.wanted))
        keymap, top = models_json_schema(unique, ref_template=REF)
        refs = {f"@{mode}:{m.__module__}.{m.__qualname__}": v["$ref"] for (m, mode), v in keymap.items()}
        return refs, top.get("$defs", {})


def _params(route: Route, doc: ApiDoc | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, conv in route.param_convertors.items():
        kind = "integer" if isinstance(conv, IntegerConvertor) else "number" if isinstance(
            conv, FloatConvertor) else "string"
        schema: dict[str, Any] = {"type": kind}
        if kind == "string":
            schema.update({"minLength": 1, "maxLength": 256, "pattern": r"^[^/]+$"})
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    if doc is not None and doc.query is not None:
        schema = doc.query.model_json_schema(ref_template=REF)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if "description" in prop:
                param["description"] = prop["description"]
            out.append(param)
    return out


def _operation(route: Route, method: str, public: bool, security_on: bool, models: _Models,
               self_service: bool = False) -> dict[str, Any]:
    endpoint = route.endpoint
    doc = doc_of(endpoint, method)
    path = route.path_format
    op: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "tags": [doc.tag if doc and doc.tag else _tag(path)],
        "summary": doc.summary if doc else f"{method} {path}",
    }
    if doc is None:
        op["x-xc-undocumented"] = True
    description = (doc.description if doc and doc.description else "").strip()
    if security_on:
        perm = permission_of(endpoint)
        if public:
            op["security"] = []
            op["x-xc-permission"] = "public"
        else:
            text = "authenticated" if self_service else (
                f"{perm[0]}:{perm[1]}" if perm else f"route:{path}:{method.lower()}")
            op["x-xc-permission"] = text
            who = ("Any authenticated principal (self-service; also a session restricted to a password change "
                   "or TOTP enrolment)." if self_service else f"Permission: `{text}`.")
            checks = f" {doc.checks}" if doc and doc.checks else ""
            description = who + checks + ("\n\n" + description if description else "")
    if description:
        op["description"] = description
    params = _params(route, doc)
    if params:
        op["parameters"] = params
    if doc is not None and (doc.body is not None or doc.raw_body):
        content: dict[str, Any] = {}
        if doc.body is not None:
            content["application/json"] = {"schema": models.ref(doc.body, "validation")}
        for media, what in doc.raw_body.items():
            content[media] = {"schema": {"type": "string", "contentMediaType": media, "description": what}}
        op["requestBody"] = {"required": doc.body_required, "content": content}
    elif doc is None and method in ("POST", "PUT", "PATCH"):
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    ok: dict[str, Any] = {"description": "Success"}
    ok_content: dict[str, Any] = {}
    if doc is None or doc.response is not None:
        ok_content["application/json"] = {"schema": models.ref(doc.response, "serialization")
                                          if doc is not None and doc.response is not None else {}}
    for media, what in (doc.streams.items() if doc else ()):
        ok_content[media] = {"schema": {"type": "string", "description": what}}
    if ok_content:
        ok["content"] = ok_content
    responses: dict[str, Any] = {str(doc.status if doc else 200): ok}
    statuses = sorted({*COMMON_ERRORS, *(doc.errors if doc else (404,))})
    if public:  # no token is checked: 401/403 only where the operation itself answers them (the login)
        statuses = [s for s in statuses if s not in (401, 403) or (doc is not None and s in doc.errors)]
    kserve = doc is not None and doc.error_model == "kserve"
    for status in statuses:
        responses[str(status)] = {"$ref": f"#/components/responses/{'K' if kserve else 'E'}{status}"}
    for status, schema in (doc.also.items() if doc else ()):
        responses[str(status)] = {"description": _STATUS_TEXT.get(status, "See the description"),
                                  "content": {"application/json": {"schema": models.ref(schema, "serialization")}}}
    responses["default"] = {"$ref": f"#/components/responses/{'KServeError' if kserve else 'Error'}"}
    op["responses"] = responses
    return op


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}").replace("-", "_").split(":")[0] for w in path.strip("/").split("/") if w]
    return "_".join([method.lower(), *words]) or method.lower()


def _tag(path: str) -> str:
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        return "core"
    if parts[0] == "v2":
        return "kserve"
    if parts[0] != "v1" or len(parts) < 2:
        return "core"
    return {"chat": "gateway", "completions": "gateway", "embeddings": "embeddings", "models": "gateway",
            "jobs": "gateway", "auth": "auth", "audit": "audit"}.get(parts[1], parts[1])


def build_document(
    routes: Iterable[BaseRoute],
    *,
    title: str = "xcstack",
    version: str = "0",
    public: Sequence[tuple[str, str]] | None = None,
    security_on: bool = True,
    description: str = "",
    self_service: Collection[str] = (),
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`; `public` lists the (method, path) pairs served without a token
    (method `*`: any), `self_service` the paths any authenticated principal may call."""
    open_set = set(public or ())
    models = _Models()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not getattr(route, "include_in_schema", True):
            continue
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            is_public = (method, route.path) in open_set or ("*", route.path) in open_set
            paths.setdefault(route.path_format, {})[method.lower()] = _operation(
                route, method, is_public, security_on, models,
                # per route, not per path: a self-service GET and a POST that requires a permission share one
                route.path in self_service and permission_of(route.endpoint) is None)
    refs, defs = models.render()
    _resolve(paths, refs)
    responses = {"Error": _error_response("Error", "Error"), "KServeError": _error_response("Error", "KServeOrError")}
    for status, text in _STATUS_TEXT.items():
        responses[f"E{status}"] = _error_response(text, "Error")
        responses[f"K{status}"] = _error_response(text, "KServeOrError" if status in BEFORE_ROUTE else "KServeError")
    either = {"description": "the KServe v2 shape from the route, xcstack's from the middleware before it",
              "anyOf": [{"$ref": REF.format(model="KServeError")}, {"$ref": REF.format(model="Error")}]}
    schemas = {"Error": error_schema(), "KServeError": kserve_error_schema(), "KServeOrError": either, **defs}
    components: dict[str, Any] = {"schemas": schemas, "responses": responses}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": components,
    }
    if security_on:
        components["securitySchemes"] = {
            "session": {"type": "http", "scheme": "bearer", "bearerFormat": "session token",
                        "description": "the `token` answered by `POST /v1/auth/login`"},
            "apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "API key",
                       "description": "an API key from `POST /v1/security/keys` or `xcstack user key create`"},
        }
        doc["security"] = [{"session": []}, {"apiKey": []}]
    return doc


def _error_response(text: str, schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": text, "content": {"application/json": {"schema": ref}}}


def _resolve(node: Any, refs: Mapping[str, str]) -> None:
    """Replace the placeholder refs of `_Models.ref` with the names `models_json_schema` chose."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("@"):
            node["$ref"] = refs[ref]
        for value in node.values():
            _resolve(value, refs)
    elif isinstance(node, list):
        for value in node:
            _resolve(value, refs)

