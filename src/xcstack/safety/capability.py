"""The safety capability: keyword and personal-information filters, evidence, content labels.

Provides `Services.safety` (a `SafetyService`) that the gateway uses on every proxied request.
Uses `crypto` (the SM2 key that signs content labels; labels are off without it) and `secrets`
(`evidence_key = "secret:NAME"`, the HMAC-SM3 key of the match digests in audit records).

Lists are read at creation: a missing or unreadable list, or a policy naming an unknown detector,
fails the start naming the config key. SIGHUP reloads the lists in place when this process owns
the signal (a standalone server); under the supervisor SIGHUP replaces the workers one at a time,
and each new worker reads the lists (no request fails either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xcstack.capability import AppContext, Wiring
from xcstack.safety.engine import ContentSafety
from xcstack.safety.label import Labeler
from xcstack.safety.service import SafetyService

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

log = logging.getLogger("xcstack.safety")

WIRING = Wiring(provides=("safety",), uses=("crypto", "secrets"))


class SafetyCapability:
    name = "safety"

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.safety
        self.engine = ContentSafety(self.settings)
        self.service = SafetyService(self.engine)
        self._sighup = False
        self._tasks: set[asyncio.Task[bool]] = set()

    def routes(self) -> Sequence[BaseRoute]:
        from xcstack.safety.routes import build_routes

        return build_routes(self.settings, self.service)

    async def start(self) -> None:
        s = self.settings
        if s.evidence_key:
            secrets = self.ctx.services.secrets
            if secrets is None:
                raise ValueError("safety.evidence_key: a secret reference needs the security capability")
            value = await secrets.resolve(s.evidence_key)
            if not value:
                raise ValueError(f"safety.evidence_key: {s.evidence_key!r} did not resolve")
            self.engine.evidence_key = value.encode("utf-8")
        crypto = self.ctx.services.crypto
        if s.label.enabled and crypto is not None:
            names = {k.get("name") for k in await crypto.list_keys()}
            if s.label.key not in names:
                await crypto.create_key(s.label.key, "sm2")
            log_dir = s.label.log_dir or Path(self.ctx.settings.data_dir) / "labels"
            self.service.labeler = Labeler(crypto, s.label.key, s.label.provider, s.label.service,
                                           s.label.explicit_text, log_dir, s.label.batch_max)
            if s.label.explicit_in_answer and s.label.explicit_text:
                self.service.explicit_suffix = "\n\n" + s.label.explicit_text
        elif s.label.enabled:
            log.warning("safety.label: the crypto capability is off; answers are not labelled")
        loop = asyncio.get_running_loop()
        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup = True

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.service.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False

    async def ready(self) -> tuple[bool, str]:
        kw = self.engine.keywords
        return True, f"{len(kw.lists)} lists, {len(self.settings.policies)} policies"


def create(ctx: AppContext) -> SafetyCapability | None:
    if not ctx.settings.safety.enabled:
        return None
    cap = SafetyCapability(ctx)
    ctx.services.safety = cap.service
    return cap
