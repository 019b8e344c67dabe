"""`SafetyService`: the safety capability's face to the gateway (`Services.safety`)."""

from __future__ import annotations

import asyncio

from xcstack.safety.engine import ContentSafety
from xcstack.safety.evidence import AuditFn, Where
from xcstack.safety.hooks import RequestSafety
from xcstack.safety.label import Label, Labeler


class SafetyService:
    def __init__(self, engine: ContentSafety, labeler: Labeler | None = None) -> None:
        self.engine = engine
        self.labeler = labeler
        self.explicit_suffix: str | None = None  # appended to answers (`safety.label.explicit_in_answer`)

    async def begin(self, *, key: str, groups: tuple[str, ...], model: str, route: str, request_id: str | None,
                    audit: AuditFn | None, generation: bool) -> RequestSafety | None:
        """The checks of one request (None: no policy applies and no label is due)."""
        plan = self.engine.plan(key, groups, model, route)
        label = None
        if generation and self.labeler is not None:
            # signed while the request goes upstream: awaited by the answer (or, for a stream, before
            # it goes upstream: the relay reads the header synchronously)
            label = asyncio.ensure_future(self.labeler.issue(request_id, model))
            label.add_done_callback(_retrieve)
        if plan is None and label is None:
            return None
        explicit = self.explicit_suffix if label is not None else None
        return RequestSafety(self.engine, plan, Where(request_id, key, model, route), audit, label, explicit)

    async def reload(self) -> bool:
        return await self.engine.reload()


def _retrieve(task: asyncio.Future[Label]) -> None:
    """A label nobody awaited (the upstream failed first): its error is not worth a warning."""
    if not task.cancelled():
        task.exception()
