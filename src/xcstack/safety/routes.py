"""`GET /v1/safety/policies`: the content-safety configuration as it runs, for the security
administrator's console view. Read-only (policies and lists change in the config file and by
SIGHUP), and never a list's words: names, categories, sha256 and word counts only."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.httputil import JSONResponse
from xcstack.safety.engine import ContentSafety
from xcstack.safety.protocol import SafetyPolicies
from xcstack.safety.service import SafetyService
from xcstack.safety.settings import SafetySettings
from xcstack.security.guard import requires


def list_actions(settings: SafetySettings, name: str) -> list[str]:
    """`<policy>:<direction>:<action>` for each policy that runs `list:<name>` (its own action or the override)."""
    det = f"list:{name}"
    out = []
    for pol in settings.policies:
        for direction in ("input", "output"):
            if det in getattr(pol, direction):
                out.append(f"{pol.name}:{direction}:{pol.actions.get(det, pol.action)}")
    return out


def describe(settings: SafetySettings, engine: ContentSafety, service: SafetyService) -> dict[str, Any]:
    """What `GET /v1/safety/policies` answers (the lists as loaded now: a reload swaps them)."""
    lab = settings.label
    return {
        "enabled": settings.enabled,
        "policies": [p.model_dump(mode="json") for p in settings.policies],
        "lists": [{"name": k.name, "category": k.category, "sha256": k.sha256, "words": k.words,
                   "actions": list_actions(settings, k.name)} for k in engine.keywords.lists],
        "label": {"enabled": lab.enabled, "active": service.labeler is not None, "provider": lab.provider,
                  "service": lab.service, "key": lab.key, "explicit_text": lab.explicit_text,
                  "explicit_in_answer": lab.explicit_in_answer, "batch_max": lab.batch_max},
        "mask": settings.mask,
        "evidence_key": settings.evidence_key or "random per start",
    }


def build_routes(settings: SafetySettings, service: SafetyService) -> list[BaseRoute]:
    @api("The content-safety policies, keyword lists (never their words) and label settings",
         response=SafetyPolicies,
         description="The security administrator's (`security.policy` read). Lists as loaded now (SIGHUP reloads "
                     "them): name, category, sha256 of the file, word count and the policies' actions on it.")
    @requires("security.policy", "read")
    async def policies(request: Request) -> Response:
        return JSONResponse(describe(settings, service.engine, service))

    return [Route("/v1/safety/policies", policies, methods=["GET"])]
