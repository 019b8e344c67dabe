"""Small HTTP helpers every capability's routes.py shares: JSON in (validated), JSON out (orjson)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from xcstack.errors import BadRequest, CoreCode, PayloadTooLarge

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # LoongArch: no orjson wheel, stdlib json fallback
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


M = TypeVar("M", bound=BaseModel)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


async def read_json(request: Request) -> Any:
    """The request body as JSON; 400 `invalid_json` when it is not."""
    body = await request.body()
    if not body:
        raise BadRequest("request body is empty; JSON expected", code=CoreCode.INVALID_JSON)
    try:
        return loads(body)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}", code=CoreCode.INVALID_JSON) from None


async def read_model(request: Request, model: type[M]) -> M:
    """The request body validated against a pydantic model; 400 names the first bad field."""
    return parse_model(await read_json(request), model)


def parse_model(data: Any, model: type[M]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> BadRequest:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = f"{loc}: {first['msg']}" if loc else str(first["msg"])
    extra = len(exc.errors()) - 1
    if extra:
        message += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return BadRequest(message, code=CoreCode.INVALID_PARAMETER, param=loc or None)


def content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    # ASCII digits only: str.isdigit() also takes '²' or Arabic-Indic digits, which int() then rejects or misreads
    return int(raw) if raw and raw.isascii() and raw.isdigit() and len(raw) <= 18 else None


def ensure_size(size: int, limit: int, what: str = "request body") -> None:
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limit}", code=CoreCode.PAYLOAD_TOO_LARGE)


#: Scope flag the security middleware sets on a public path reached without a valid token.
ANONYMOUS_PROBE = "xc.anonymous_probe"


def probe_body(scope: Scope, ready: bool, detail: str) -> dict[str, Any]:
    """A readiness verdict for a health probe: the detail (paths, backends, audit position) only for a
    caller the security middleware did not flag as anonymous."""
    return {"ready": ready} if scope.get(ANONYMOUS_PROBE) else {"ready": ready, "detail": detail}
