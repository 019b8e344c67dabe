"""The console's plumbing: the in-process API client, CSRF tokens, cookies and page rendering.

The console holds no privileges of its own. Every action is one call of the public JSON API, made
in process through the whole app (middleware, route guard, audit) with the caller's own session
token: the API's RBAC decides, exactly as it does for curl, and the audit log shows both the console
page and the API call it made (same request id).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from xcstack.console.i18n import LANG_COOKIE, pick_language, translator
from xcstack.console.settings import ConsoleSettings
from xcstack.errors import CoreCode, Forbidden, NotFound, Unauthorized
from xcstack.httputil import dumps, loads
from xcstack.security.guard import audit
from xcstack.security.middleware import CAN, CONSOLE_COOKIE, CONSOLE_VIA_COOKIE, bearer, console_cookie

if TYPE_CHECKING:  # imported at the first page (Pages.ready): most http workers never render one
    import jinja2

HERE = Path(__file__).parent
PRE_COOKIE = "xc_console_pre"  # the sign-in form's CSRF secret (no session exists yet)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store", "Cross-Origin-Opener-Policy": "same-origin",
}
MAX_FORM_BYTES = 64 * 1024
HTML = {"text/html": "a console page"}  # what a page handler answers, for its @api mark
# `page(request, template, status=200, *, api=None, **ctx)`: renders a page (console/routes.py build_routes)
Page = Callable[..., Awaitable[Response]]


def seg(value: str) -> str:
    """A path segment for an API call: a name holding '/' (or NUL) names nothing, so it cannot reach
    another route (which would check its own permission anyway)."""
    if "/" in value or "\x00" in value:
        raise NotFound("no such name", code=CoreCode.NOT_FOUND)
    return value


def csrf_for(secret: str, purpose: str = "session") -> str:
    """The synchroniser token of a session (or of the sign-in form's pre-session cookie): an HMAC of
    the secret cookie, which a cross-site page can neither read nor compute. No server state, so any
    worker checks it."""
    return hmac.new(secret.encode(), b"xc-console-csrf:" + purpose.encode(), hashlib.sha256).hexdigest()[:40]


def session_token(request: Request) -> str | None:
    """The caller's session token: the Authorization header, else the console cookie."""
    return bearer(request.scope) or console_cookie(request.scope)


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(resp: Response, request: Request, name: str, value: str, max_age: int | None = None) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="strict",
                    secure=is_https(request))


def key_request(form: dict[str, str]) -> dict[str, Any]:
    """The body of an API-key request from the key form (name, comma-separated roles, optional days)."""
    body: dict[str, Any] = {"name": form.get("name", "").strip(),
                            "roles": [x.strip() for x in form.get("roles", "").split(",") if x.strip()]}
    if form.get("days", "").strip().isdigit():
        body["days"] = int(form["days"])
    return body


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form, first value of each field (bounded)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden("form too large", code=CoreCode.FORBIDDEN)
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


async def check_csrf(request: Request, form: dict[str, str], secret: str | None = None,
                     purpose: str = "session") -> None:
    """Refuse (403, audited) a state-changing request authenticated by the ambient cookie unless it
    carries the session's token and, when the browser says where it comes from, our own origin.
    A bearer-header caller needs no token: nothing ambient authenticates it."""
    if secret is None:
        if not request.scope.get(CONSOLE_VIA_COOKIE):
            return
        secret = console_cookie(request.scope)
    sent = form.get("csrf") or request.headers.get("x-csrf-token") or ""
    origin = request.headers.get("origin")
    ok = bool(secret) and hmac.compare_digest(sent, csrf_for(secret or "", purpose))
    if origin and origin != "null":
        host = urlsplit(origin).netloc
        ok = ok and host == request.headers.get("host", "")
    elif origin == "null":
        ok = False
    if not ok:
        await audit(request, "console.csrf", f"route:{request.url.path[:256]}", "denied",
                    {"origin": (origin or "")[:200]})
        raise Forbidden("cross-site request refused: the console's CSRF token is missing or wrong",
                        code=CoreCode.FORBIDDEN)


class ApiResult:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.raw = body
        self.headers = headers

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return loads(self.raw) if self.raw else None

    @property
    def error(self) -> str:
        """The API's error message (and code) for a flash line."""
        try:
            err = self.json().get("error") or {}
            return f"{err.get('message', '')} ({err.get('code', self.status)})"
        except Exception:
            return f"HTTP {self.status}"

    @property
    def code(self) -> str:
        try:
            return str((self.json().get("error") or {}).get("code", ""))
        except Exception:
            return ""

    @property
    def problem(self) -> str | None:
        """The error line a page shows for this answer; None for a success."""
        return None if self.ok else self.error

    def items(self, key: str) -> list[Any]:
        """The list under `key` of a successful answer; [] otherwise (the page shows the error instead)."""
        body = self.json() if self.ok else None
        value = body.get(key) if isinstance(body, dict) else None
        return value if isinstance(value, list) else []

    def outcome(self, word: str = "saved", ok_status: int = 200) -> dict[str, Any]:
        """A form action's result for the page it re-renders: status, error line, flash word."""
        return {"status": ok_status if self.ok else self.status, "api_error": self.problem,
                "flash": [word] if self.ok else []}


async def call_api(request: Request, method: str, path: str, *, query: dict[str, Any] | None = None,
                   json: Any = None, token: str | None = None) -> ApiResult:
    """One call of the JSON API through the whole app, as the caller (its own token; none for the
    public sign-in). Same client address and request id as the console request, for the audit log."""
    token = token if token is not None else session_token(request)
    body = dumps(json) if json is not None else b""
    headers: list[tuple[bytes, bytes]] = [(b"host", request.headers.get("host", "localhost").encode("latin-1")),
                                          (b"accept", b"application/json"), (b"user-agent", b"xcstack-console")]
    if token:
        headers.append((b"authorization", b"Bearer " + token.encode("latin-1")))
    if json is not None:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in request.scope.get("headers", ()):
        if k == b"x-forwarded-for":
            headers.append((k, v))
    rid = request.scope.get("xc.request_id")
    if isinstance(rid, str):
        headers.append((b"x-request-id", rid.encode("latin-1")))
    q = {k: v for k, v in (query or {}).items() if v not in (None, "")}
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": request.url.scheme, "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": urlencode(q).encode(), "headers": headers, "client": request.scope.get("client"),
        "server": request.scope.get("server"), "state": dict(request.scope.get("state") or {}),
    }
    done = asyncio.Event()
    sent = False
    status, out_headers, chunks = 500, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            out_headers.update({k.decode("latin-1").lower(): v.decode("latin-1")
                                for k, v in message.get("headers", ())})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    try:
        await request.scope["app"](scope, receive, send)
    finally:
        done.set()
    return ApiResult(status, b"".join(chunks), out_headers)


async def can(request: Request, resource: str, action: str) -> bool:
    """Whether the caller's roles allow it (for menus and optional sections; audits nothing). The
    server checks again on every action: hiding a button is not authorization."""
    check = request.scope.get(CAN)
    principal = request.scope.get("xc.principal")
    if check is None:
        return principal is None  # security off: AllowAll (the console is not built then)
    if principal is None:
        return False
    return bool(await check(principal, resource, action))


def principal_of(request: Request) -> Any:
    pr = request.scope.get("xc.principal")
    if pr is None:
        raise Unauthorized("authentication required", code=CoreCode.UNAUTHORIZED)
    return pr


class Pages:
    """Jinja2 pages (autoescaped) with the console's headers, language and time zone.

    jinja2 (with markupsafe, ~1.6 MB of RSS) is imported and the environment built at the first page,
    off the event loop (`ready`), not in every http worker: most never serve a console page."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.timezone)
        self._env: jinja2.Environment | None = None

    async def ready(self) -> None:
        """Build the environment in a thread the first time (the import takes tens of ms); then a no-op."""
        if self._env is None:
            env = await asyncio.to_thread(self._make_env)
            if self._env is None:  # two first pages at once: keep one environment
                self._env = env

    @property
    def env(self) -> jinja2.Environment:
        if self._env is None:  # a caller that skipped `ready`: build it here, once
            self._env = self._make_env()
        return self._env

    def _make_env(self) -> jinja2.Environment:
        import jinja2

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
            trim_blocks=True, lstrip_blocks=True)
        env.filters["dt"] = self.format_time
        env.filters["uptime"] = format_uptime
        env.filters["pretty"] = lambda v: dumps(v).decode() if not isinstance(v, str) else v
        return env

    def format_time(self, value: Any) -> str:
        """UNIX seconds or an ISO UTC timestamp, in the configured zone."""
        if value in (None, ""):
            return ""
        try:
            if isinstance(value, (int, float)):
                t = dt.datetime.fromtimestamp(float(value), dt.UTC)
            else:
                t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
                if t.tzinfo is None:
                    t = t.replace(tzinfo=dt.UTC)
            return t.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S")
        except (ValueError, OverflowError, OSError):
            return str(value)

    def render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        started = time.perf_counter()
        lang = pick_language(request, self.settings.default_language)
        token = console_cookie(request.scope) if request.scope.get(CONSOLE_VIA_COOKIE) else None
        ctx.setdefault("flash", [])
        ctx.setdefault("errors", [])
        html = self.env.get_template(template).render(
            t=translator(lang), lang=lang, csrf=ctx.pop("csrf", None) or (csrf_for(token) if token else ""),
            principal=request.scope.get("xc.principal"), path=request.url.path, tz=self.settings.timezone,
            poll_ms=int(self.settings.poll_s * 1000), **ctx)
        resp = HTMLResponse(html, status_code=status, headers={
            **SECURITY_HEADERS, "Server-Timing": f"render;dur={(time.perf_counter() - started) * 1000:.1f}"})
        if request.query_params.get("lang") == lang:
            resp.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, path="/console", samesite="strict",
                            httponly=True, secure=is_https(request))
        return resp


def format_uptime(seconds: Any) -> str:
    """`3d 4h`, `4h 5m`, `5m 6s`, `6s` (console.js writes the same); '–' for nothing."""
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return "–"
    if s < 0:
        return "–"
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s % 60}s" if m else f"{s}s"


def new_pre_secret() -> str:
    return secrets.token_urlsafe(24)


__all__ = ["CONSOLE_COOKIE", "HTML", "PRE_COOKIE", "ApiResult", "Page", "Pages", "call_api", "can", "check_csrf",
           "csrf_for", "new_pre_secret", "principal_of", "read_form", "seg", "session_token", "set_cookie"]
