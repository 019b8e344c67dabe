"""HTTP adapter of the security capability.

Self-service (any authenticated principal, also a restricted session):
  POST /v1/auth/login (public) · POST /v1/auth/logout · GET /v1/auth/me · POST /v1/auth/password
  POST /v1/auth/totp/enroll · POST /v1/auth/totp/confirm
Administration (RBAC):
  GET/POST /v1/security/users · DELETE /v1/security/users/{name}
  POST /v1/security/users/{name}/disable|enable|reset-password|reset-totp      security.user
  PUT /v1/security/users/{name}/roles                                          security.role:assign
  GET/POST /v1/security/roles · DELETE /v1/security/roles/{name}               security.role
  GET/POST /v1/security/keys · DELETE /v1/security/keys/{id}                   security.apikey
  GET/POST /v1/security/groups · DELETE /v1/security/groups/{name}
  PUT /v1/security/users/{name}/group · PUT /v1/security/keys/{id}/group        security.group
  GET/POST /v1/security/me/keys · DELETE /v1/security/me/keys/{id}           own keys (authenticated)
Security policy (secadmin): GET /v1/security/lockouts · DELETE /v1/security/lockouts/{name}
  GET /v1/security/secrets (names only) · GET /v1/security/sessions
  DELETE /v1/security/sessions/{id}                                             security.policy
Audit (auditor only):
  GET /v1/audit/records · POST /v1/audit/verify · GET /v1/audit/chains          audit:read / audit:verify
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.errors import BadRequest, CoreCode, NotFound, Unauthorized
from xcstack.httputil import JSONResponse, parse_model, read_model
from xcstack.security import protocol as p
from xcstack.security.audit import record as rec
from xcstack.security.audit.files import list_chains, list_segments, read_segment
from xcstack.security.audit.verify import SigVerify, verify_chain
from xcstack.security.guard import authenticated, public, requires
from xcstack.security.lockout import identity_key
from xcstack.security.service import Principal, ReqInfo

if TYPE_CHECKING:
    from xcstack.security.secrets import SecretStore
    from xcstack.security.service import SecurityService

USER_404 = p.SecurityCode.USER_NOT_FOUND
ROLE_404 = p.SecurityCode.ROLE_NOT_FOUND
KEY_404 = p.SecurityCode.APIKEY_NOT_FOUND
SELF = "Self-service: any authenticated principal, also a session restricted to a password change or TOTP enrolment."
OWN = ("Self-service: any signed-in principal, for its own keys (a key used for the call: its owner's); a session "
       "restricted to a password change or TOTP enrolment may list but not issue (403).")
ADMIN_ACCOUNTS = ("Accounts holding sysadmin, secadmin or auditor are managed from the server console, not by another "
                  "administrator through the API (403, 三权分立).")


USER_ACTIONS = {
    "disable": "Disable a user (ends its sessions)",
    "enable": "Enable a disabled user",
    "reset-password": "Reset a user's password to a one-time password",
    "reset-totp": "Remove a user's TOTP enrolment (it enrols again at the next login)",
}


def _principal(request: Request) -> Principal:
    pr = request.scope.get("xc.principal")
    if not isinstance(pr, Principal):
        raise Unauthorized("authentication required", code=CoreCode.UNAUTHORIZED)
    return pr


def _name(request: Request, key: str, what: str, code: p.SecurityCode) -> str:
    """A path parameter naming a stored user, role or key. No name holds a NUL character (and PostgreSQL
    refuses one in a query: 500), so such a name is simply not found."""
    value: str = request.path_params[key]
    if "\x00" in value:
        raise NotFound(f"no {what} {value!r}", code=code)
    return value


def _info(request: Request) -> ReqInfo:
    ip = request.scope.get("xc.client_ip") or (request.client.host if request.client else None)
    return ReqInfo(ip, request.scope.get("xc.request_id"))


def build_routes(svc: SecurityService, audit_root: Path, sig_verify: SigVerify,
                 secrets: SecretStore | None = None) -> list[BaseRoute]:
    """The routes over the security service and the audit chains under `audit_root` (checkpoint
    signatures checked with `sig_verify`); `secrets`: the named secrets (names only, never values)."""

    @public
    @api("Sign in: a session token for a user name and password (and a TOTP or recovery code once enrolled)",
         body=p.LoginRequest, response=p.LoginResult, errors=(401,),
         description="Wrong credentials answer 401 `invalid_credentials`, a missing or wrong second factor 401 "
                     "`totp_required` / `invalid_totp`; repeated failures lock the account (429 `account_locked`).")
    async def login(request: Request) -> Response:
        body = await read_model(request, p.LoginRequest)
        out = await svc.login(body.username, body.password, body.totp, body.recovery_code, _info(request))
        return JSONResponse(out)

    @authenticated
    @api("Sign out: end this session", body=None, response=p.SecurityOk, checks=SELF)
    async def logout(request: Request) -> Response:
        await svc.logout(_principal(request), _info(request))
        return JSONResponse({"ok": True})

    @authenticated
    @api("Who the caller is: its principal, roles and session restriction", response=p.PrincipalInfo, checks=SELF)
    async def me(request: Request) -> Response:
        return JSONResponse(_principal(request).to_dict())

    @authenticated
    @api("Change the caller's own password (ends the user's other sessions)", body=p.PasswordChange,
         response=p.SecurityOk, checks=SELF,
         description="A wrong current password answers 401 `invalid_credentials` and counts toward the lockout; "
                     "a password the policy rejects 400 `password_policy`. API keys have no password (403).")
    async def password(request: Request) -> Response:
        body = await read_model(request, p.PasswordChange)
        await svc.change_password(_principal(request), body.old_password, body.new_password, _info(request))
        return JSONResponse({"ok": True})

    @authenticated
    @api("Begin TOTP enrolment: a new secret for the caller's authenticator app", body=None,
         response=p.TotpEnrollment, errors=(409,), checks=SELF)
    async def totp_enroll(request: Request) -> Response:
        return JSONResponse(await svc.totp_begin(_principal(request), _info(request)))

    @authenticated
    @api("Finish TOTP enrolment with a first code; answers the recovery codes", body=p.TotpConfirm,
         response=p.RecoveryCodes, errors=(409,), checks=SELF)
    async def totp_confirm(request: Request) -> Response:
        body = await read_model(request, p.TotpConfirm)
        codes = await svc.totp_confirm(_principal(request), body.code, _info(request))
        return JSONResponse({"recovery_codes": codes})

    @api("List the users", response=p.UserList)
    @requires("security.user", "read")
    async def users_list(request: Request) -> Response:
        return JSONResponse({"users": await svc.list_users()})

    @api("Create a user (without a password: a one-time password is answered, to change at first login)",
         body=p.UserCreate, response=p.UserCreated, status=201, errors=(409,),
         checks="Giving the user roles also needs `security.role:assign`.")
    @requires("security.user", "write")
    async def users_create(request: Request) -> Response:
        body = await read_model(request, p.UserCreate)
        user, one_time = await svc.create_user(_principal(request), body.name, body.roles, body.kind, body.password,
                                               _info(request))
        out: dict[str, Any] = {"user": user}
        if one_time:
            out["one_time_password"] = one_time
        return JSONResponse(out, status_code=201)

    @api("Delete a user (ends its sessions, revokes its API keys)", response=p.SecurityOk, errors=(404,),
         description=ADMIN_ACCOUNTS)
    @requires("security.user", "write")
    async def users_delete(request: Request) -> Response:
        await svc.delete_user(_principal(request), _name(request, "name", "user", USER_404), _info(request))
        return JSONResponse({"ok": True})

    def users_action(action: str) -> Callable[[Request], Awaitable[Response]]:
        """One of the four user actions, each its own route (`POST .../{name}/roles` is then a 405, not a
        404 from a catch-all, and each action has its own contract)."""

        @api(USER_ACTIONS[action], body=None, response=p.UserActionResult, errors=(404,),
             description=("Answers `{\"one_time_password\"}` (shown once, to change at the next login) and ends "
                          "the user's sessions. " if action == "reset-password" else
                          "Ends the user's sessions. " if action == "disable" else "") + ADMIN_ACCOUNTS)
        @requires("security.user", "write")
        async def act(request: Request) -> Response:
            name = _name(request, "name", "user", USER_404)
            pr, info = _principal(request), _info(request)
            if action in ("disable", "enable"):
                await svc.set_disabled(pr, name, action == "disable", info)
                return JSONResponse({"ok": True})
            if action == "reset-password":
                return JSONResponse({"one_time_password": await svc.reset_password(pr, name, info)})
            await svc.totp_reset(pr, name, info)
            return JSONResponse({"ok": True})

        return act

    @api("Set a user's roles (replaces them)", body=p.RolesSet, response=p.SecurityOk, errors=(404,),
         description="Nobody changes their own roles, and the sysadmin, secadmin and auditor roles are granted "
                     "and removed from the server console only (403, 三权分立).")
    @requires("security.role", "assign")
    async def users_roles(request: Request) -> Response:
        body = await read_model(request, p.RolesSet)
        await svc.set_roles(_principal(request), _name(request, "name", "user", USER_404), body.roles,
                            _info(request))
        return JSONResponse({"ok": True})

    @api("List the roles, built-in and custom", response=p.RoleList)
    @requires("security.role", "read")
    async def roles_list(request: Request) -> Response:
        return JSONResponse({"roles": await svc.list_roles()})

    @api("Create a custom role from (resource, action) permissions", body=p.RoleCreate, response=p.RoleInfo,
         status=201, errors=(409,),
         description="A custom role cannot hold `security.*` or `audit` rights (400 `separation_of_duties`).")
    @requires("security.role", "write")
    async def roles_create(request: Request) -> Response:
        body = await read_model(request, p.RoleCreate)
        role = await svc.create_role(_principal(request), body.name, list(body.allow), list(body.deny),
                                     body.description, _info(request))
        return JSONResponse(role, status_code=201)

    @api("Delete a custom role", response=p.SecurityOk, errors=(404,),
         description="Built-in roles cannot be deleted (400 `builtin_role`).")
    @requires("security.role", "write")
    async def roles_delete(request: Request) -> Response:
        await svc.delete_role(_principal(request), _name(request, "name", "role", ROLE_404), _info(request))
        return JSONResponse({"ok": True})

    @api("List the API keys (never the keys themselves)", response=p.ApiKeyList)
    @requires("security.apikey", "read")
    async def keys_list(request: Request) -> Response:
        return JSONResponse({"keys": await svc.list_api_keys()})

    @api("Issue an API key owned by the caller; answers the key once", body=p.ApiKeyCreate,
         response=p.ApiKeyCreated, status=201,
         description="A key carries no right its creator lacks (403) and does not outlive the key it was "
                     "created with; `days` defaults to and is bounded by `[security] api_key_max_days`.")
    @requires("security.apikey", "write")
    async def keys_create(request: Request) -> Response:
        body = await read_model(request, p.ApiKeyCreate)
        out = await svc.create_api_key(_principal(request), body.name, body.roles, body.days, _info(request))
        return JSONResponse(out, status_code=201)

    @api("Revoke an API key", response=p.SecurityOk, errors=(404,))
    @requires("security.apikey", "write")
    async def keys_revoke(request: Request) -> Response:
        await svc.revoke_api_key(_principal(request), _name(request, "id", "API key", KEY_404),
                                 _info(request))
        return JSONResponse({"ok": True})

    # -- self-service API keys: the caller's own ------------------------------------------------------
    @authenticated
    @api("The caller's own API keys (never the keys themselves)", response=p.ApiKeyList, checks=OWN)
    async def my_keys_list(request: Request) -> Response:
        return JSONResponse({"keys": await svc.list_own_api_keys(_principal(request))})

    @authenticated
    @api("Issue an API key for the caller with some of its own roles; answers the key once", body=p.ApiKeyCreate,
         response=p.ApiKeyCreated, status=201, checks=OWN,
         description="Only roles the caller holds, and none of sysadmin, secadmin, auditor (403 `forbidden`; "
                     "a role that does not exist: 400 `unknown_role`); `days` defaults to and is bounded by "
                     "`[security] api_key_max_days` (400 `invalid_parameter`) and by the expiry of the key the "
                     "call is made with. Audited (`apikey.create`).")
    async def my_keys_create(request: Request) -> Response:
        body = await read_model(request, p.ApiKeyCreate)
        out = await svc.create_own_api_key(_principal(request), body.name, body.roles, body.days, _info(request))
        return JSONResponse(out, status_code=201)

    @authenticated
    @api("Revoke one of the caller's own API keys", response=p.SecurityOk, errors=(404,), checks=OWN,
         description="Someone else's key (or none): 404 `apikey_not_found`. Audited (`apikey.revoke`).")
    async def my_keys_revoke(request: Request) -> Response:
        await svc.revoke_own_api_key(_principal(request), _name(request, "id", "API key", KEY_404), _info(request))
        return JSONResponse({"ok": True})

    # -- groups (docs/usage.md) ------------------------------------------------------------------------
    @api("List the groups (部门/租户) with their numbers of users and API keys", response=p.GroupList)
    @requires("security.group", "read")
    async def groups_list(request: Request) -> Response:
        return JSONResponse({"groups": await svc.groups.list()})

    @api("Create a group", body=p.GroupCreate, response=p.SecurityOk, status=201, errors=(409,),
         description="409 `group_exists`. Audited (`group.create`).")
    @requires("security.group", "write")
    async def groups_create(request: Request) -> Response:
        body = await read_model(request, p.GroupCreate)
        await svc.groups.create(_principal(request), body.name, body.description, _info(request))
        return JSONResponse({"ok": True}, status_code=201)

    @api("Delete a group without members", response=p.SecurityOk, errors=(404, 409),
         description="404 `group_not_found`; 409 `group_in_use` while users or API keys are in it.")
    @requires("security.group", "write")
    async def groups_delete(request: Request) -> Response:
        name = _name(request, "name", "group", p.SecurityCode.GROUP_NOT_FOUND)
        await svc.groups.delete(_principal(request), name, _info(request))
        return JSONResponse({"ok": True})

    @api("Put a user in a group (null: none)", body=p.GroupAssign, response=p.SecurityOk, errors=(404,),
         description="400 `group_not_found` for a group that does not exist. Audited (`group.assign`).")
    @requires("security.group", "write")
    async def users_group(request: Request) -> Response:
        body = await read_model(request, p.GroupAssign)
        await svc.groups.assign_user(_principal(request), _name(request, "name", "user", USER_404), body.group,
                                     _info(request))
        return JSONResponse({"ok": True})

    @api("Put an API key in a group of its own (null: its owner's)", body=p.GroupAssign, response=p.SecurityOk,
         errors=(404,), description="400 `group_not_found` for a group that does not exist. Audited.")
    @requires("security.group", "write")
    async def keys_group(request: Request) -> Response:
        body = await read_model(request, p.GroupAssign)
        await svc.groups.assign_key(_principal(request), _name(request, "id", "API key", KEY_404), body.group,
                                    _info(request))
        return JSONResponse({"ok": True})

    @api("List the audit chains and their segment files", response=p.AuditChainList)
    @requires("audit", "read")
    async def audit_chains(request: Request) -> Response:
        chains = [{"chain": d.name, "segments": [s.name for _, s in list_segments(d)]}
                  for d in list_chains(audit_root)]
        return JSONResponse({"chains": chains})

    @api("Read audit records: one chain from `after_seq` on, or every chain merged by time", query=p.AuditQuery,
         response=p.AuditPage, errors=(404,),
         description="The read itself is audited (`audit.read`). An unknown `chain` answers 404 `not_found`.")
    @requires("audit", "read")
    async def audit_records(request: Request) -> Response:
        q = parse_model(dict(request.query_params), p.AuditQuery)
        page = await asyncio.to_thread(read_records, audit_root, q)
        await svc.audit(_principal(request).name, "audit.read", f"audit:{q.chain or '*'}", "success", _info(request),
                        {"query": q.model_dump(exclude_none=True), "returned": len(page["records"])})
        return JSONResponse(page)

    @api("Verify every audit chain (hashes, checkpoints, signatures)", body=None, response=p.AuditVerifyResult,
         description="A chain that fails answers 200 with `ok: false` and the first bad record; audited "
                     "(`audit.verify`).")
    @requires("audit", "verify")
    async def audit_verify(request: Request) -> Response:
        reports = [(await verify_chain(d, sig_verify)).to_dict() for d in list_chains(audit_root)]
        ok = all(r["ok"] for r in reports)
        await svc.audit(_principal(request).name, "audit.verify", "audit:*", "success" if ok else "failure",
                        _info(request), {"chains": len(reports), "ok": ok})
        return JSONResponse({"ok": ok, "chains": reports})

    # -- security policy enforcement (secadmin): lockouts, secret names -------------------------------
    @api("The accounts locked by failed sign-ins, with the seconds left", response=p.LockoutList,
         description="Lockouts are counted per user name (also names that do not exist); this lists the users'.")
    @requires("security.policy", "read")
    async def lockouts_list(request: Request) -> Response:
        out = []
        for u in await svc.list_users():
            left = await svc.lockout.locked_for(identity_key(u["name"]))
            if left > 0:
                out.append({"user": u["name"], "locked_for_s": round(left, 1)})
        return JSONResponse({"locked": out})

    @api("Unlock an account locked by failed sign-ins (audited `security.unlock`)", response=p.SecurityOk,
         errors=(404,))
    @requires("security.policy", "write")
    async def lockouts_clear(request: Request) -> Response:
        name = _name(request, "name", "user", USER_404)
        if not any(u["name"] == name for u in await svc.list_users()):
            raise NotFound(f"no user {name!r}", code=USER_404)
        await svc.lockout.reset(identity_key(name))
        await svc.audit(_principal(request).name, "security.unlock", f"user:{name}", "success", _info(request))
        return JSONResponse({"ok": True})

    @api("The active sessions: id, user, created, last seen, client address (never a token)",
         response=p.SessionList,
         description="`last_seen` is written at most every 30 s. Sessions past their idle or absolute timeout "
                     "are not listed.")
    @requires("security.policy", "read")
    async def sessions_list(request: Request) -> Response:
        return JSONResponse({"sessions": await svc.list_sessions()})

    @api("End a session now (audited `session.end`); its token is refused at once by this worker, by the others "
         "within `[security] auth_cache_s`", response=p.SecurityOk, errors=(404,),
         description="An id that is not listed: 404 `not_found`.")
    @requires("security.policy", "write")
    async def sessions_end(request: Request) -> Response:
        sid = request.path_params["id"]
        if not (sid.isascii() and sid.isalnum()):
            raise NotFound(f"no session {sid!r}", code=CoreCode.NOT_FOUND)
        await svc.end_session(_principal(request), sid, _info(request))
        return JSONResponse({"ok": True})

    @api("The named secrets at rest: names and when each was set (never a value)", response=p.SecretNameList)
    @requires("security.policy", "read")
    async def secrets_list(request: Request) -> Response:
        return JSONResponse({"secrets": await secrets.names() if secrets is not None else []})

    return [
        Route("/v1/auth/login", login, methods=["POST"]),
        Route("/v1/auth/logout", logout, methods=["POST"]),
        Route("/v1/auth/me", me, methods=["GET"]),
        Route("/v1/auth/password", password, methods=["POST"]),
        Route("/v1/auth/totp/enroll", totp_enroll, methods=["POST"]),
        Route("/v1/auth/totp/confirm", totp_confirm, methods=["POST"]),
        Route("/v1/security/users", users_list, methods=["GET"]),
        Route("/v1/security/users", users_create, methods=["POST"]),
        Route("/v1/security/users/{name}", users_delete, methods=["DELETE"]),
        Route("/v1/security/users/{name}/roles", users_roles, methods=["PUT"]),
        *(Route(f"/v1/security/users/{{name}}/{action}", users_action(action), methods=["POST"])
          for action in USER_ACTIONS),
        Route("/v1/security/roles", roles_list, methods=["GET"]),
        Route("/v1/security/roles", roles_create, methods=["POST"]),
        Route("/v1/security/roles/{name}", roles_delete, methods=["DELETE"]),
        Route("/v1/security/keys", keys_list, methods=["GET"]),
        Route("/v1/security/keys", keys_create, methods=["POST"]),
        Route("/v1/security/keys/{id}", keys_revoke, methods=["DELETE"]),
        Route("/v1/security/keys/{id}/group", keys_group, methods=["PUT"]),
        Route("/v1/security/groups", groups_list, methods=["GET"]),
        Route("/v1/security/groups", groups_create, methods=["POST"]),
        Route("/v1/security/groups/{name}", groups_delete, methods=["DELETE"]),
        Route("/v1/security/users/{name}/group", users_group, methods=["PUT"]),
        Route("/v1/audit/chains", audit_chains, methods=["GET"]),
        Route("/v1/audit/records", audit_records, methods=["GET"]),
        Route("/v1/audit/verify", audit_verify, methods=["POST"]),
        Route("/v1/security/lockouts", lockouts_list, methods=["GET"]),
        Route("/v1/security/lockouts/{name}", lockouts_clear, methods=["DELETE"]),
        Route("/v1/security/secrets", secrets_list, methods=["GET"]),
        Route("/v1/security/sessions", sessions_list, methods=["GET"]),
        Route("/v1/security/sessions/{id}", sessions_end, methods=["DELETE"]),
        Route("/v1/security/me/keys", my_keys_list, methods=["GET"]),
        Route("/v1/security/me/keys", my_keys_create, methods=["POST"]),
        Route("/v1/security/me/keys/{id}", my_keys_revoke, methods=["DELETE"]),
    ]


def _match(obj: dict[str, Any], q: p.AuditQuery) -> bool:
    return (
        (q.action is None or obj.get("action") == q.action)
        and (q.actor is None or obj.get("actor") == q.actor)
        and (q.outcome is None or obj.get("outcome") == q.outcome)
    )


def read_records(audit_root: Path, q: p.AuditQuery) -> dict[str, Any]:
    """A page of audit records under `audit_root` (blocking: file reads; the route runs it in a thread)."""
    chains = list_chains(audit_root)
    if q.chain is not None:
        chains = [c for c in chains if c.name == q.chain]
        if not chains:
            raise NotFound(f"no audit chain {q.chain!r}", code=CoreCode.NOT_FOUND)
        out: list[dict[str, Any]] = []
        for first, path in list_segments(chains[0]):
            data = read_segment(path)  # closed segments are compressed
            seq = first
            for line in data.split(b"\n")[:-1]:
                if seq > q.after_seq:
                    obj = rec.loads(line)
                    if _match(obj, q):
                        out.append(obj)
                        if len(out) >= q.limit:
                            return {"records": out, "next_after_seq": out[-1]["seq"]}
                seq += 1
        return {"records": out, "next_after_seq": out[-1]["seq"] if out else q.after_seq}
    # every chain, merged by (ts, chain, seq)
    after: tuple[str, str, int] | None = None
    if q.after:
        try:
            a_ts, a_chain, a_seq = q.after.rsplit("|", 2)
            if not (a_seq.isascii() and a_seq.isdigit()):  # int() would also take "١٢", " 12", "1_2"
                raise ValueError(a_seq)
            after = (a_ts, a_chain, int(a_seq))
        except ValueError:
            raise BadRequest("after: use the 'next' value of the previous page",
                             code=CoreCode.INVALID_PARAMETER) from None
    since = q.since or ""
    until = q.until or "9999"
    since_epoch = _epoch(since) if since else 0.0
    picked: list[tuple[str, str, int, dict[str, Any]]] = []
    for chain in chains:
        for _, path in list_segments(chain):
            if since_epoch and path.stat().st_mtime < since_epoch:
                continue  # the segment's newest record is older than `since`
            for line in read_segment(path).split(b"\n")[:-1]:
                obj = rec.loads(line)
                key = (str(obj.get("ts", "")), chain.name, int(obj.get("seq", 0)))
                if key[0] < since or key[0] > until or (after is not None and key <= after) or not _match(obj, q):
                    continue
                picked.append((*key, obj))
    picked.sort(key=lambda t: t[:3])
    page = picked[: q.limit]
    nxt = f"{page[-1][0]}|{page[-1][1]}|{page[-1][2]}" if len(picked) > q.limit else None
    return {"records": [t[3] for t in page], "next": nxt}


def _epoch(ts: str) -> float:
    import datetime as dt

    text = ts.rstrip("Z")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else ("%Y-%m-%dT%H:%M:%S" if "T" in text else "%Y-%m-%d")
    try:
        return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC).timestamp() - 1.0
    except ValueError:
        return 0.0
