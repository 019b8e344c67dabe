"""Checks real answers against the OpenAPI document the app serves, resolving its `#/components/...`
references (jsonschema Draft 2020-12 with a `referencing` registry). Shared by the contract tests."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:xcstack:openapi"


class Contract:
    """Validates bodies against the schemas the document gives, resolving `#/components/...` in it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, Resource(doc, DRAFT202012))

    def response_schema(self, method: str, path: str, status: int, media: str = "application/json") -> Any:
        responses = self.doc["paths"][path][method]["responses"]
        resp = responses.get(str(status), responses["default"])
        if "$ref" in resp:
            resp = self.doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        return resp["content"][media]["schema"]

    def request_schema(self, method: str, path: str) -> Any:
        return self.doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]

    def errors(self, body: Any, schema: Any) -> list[str]:
        # the document's refs are `#/components/...`: point them at the document in the registry
        anchored = orjson.loads(orjson.dumps(schema).replace(b'"#/components/', f'"{DOC_URI}#/components/'.encode()))
        validator = jsonschema.Draft202012Validator(anchored, registry=self.registry)
        return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(body)]

    def check(self, r: Any, method: str, path: str, status: int | None = None) -> Any:
        """The answer's JSON body, after checking it (and its status, when given) against the document."""
        if status is not None:
            assert r.status_code == status, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        problems = self.errors(body, self.response_schema(method, path, r.status_code))
        assert not problems, (method, path, r.status_code, problems, body)
        return body
