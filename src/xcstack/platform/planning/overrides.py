"""Config overrides of the tuning plan: what an operator pinned down by hand in [server] and [inference].

Kept apart from the phases so the supervisor, the model worker and `xcstack doctor` build them from
Settings the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PlanOverrides:
    """Config that wins over the automatic plan; `None` everywhere means "derive it from the machine"."""

    http_workers: int | None = None
    worker_cpus: list[int] | None = None  # cores the http workers may use
    model_workers: int | None = None  # 0: no model workers
    model_cpus: list[int] | None = None  # cores the model workers may use (one worker per core)
    model_worker_cpus: list[list[int]] | None = None  # explicit cores of each model worker
    pin: bool | None = None
    event_loop: str | None = None  # "auto" | "uvloop" | "asyncio"
    backlog: int | None = None  # listen backlog, checked against somaxconn
    llm: bool = False  # a llama.cpp worker runs (its model is there): it gets compute cores of its own
    llm_cpus: list[int] | None = None  # [llm] cpus: the llm worker's cores

    @classmethod
    def from_settings(cls, settings: Any) -> PlanOverrides:
        """From xcstack Settings: [server] workers / worker_cpus / pin_cpus / loop / backlog, and
        [inference] workers / worker_cpus (per-worker core lists); inference disabled or `mode = "inline"`
        means no model worker processes (every planned core serves http unless an llm worker runs);
        [llm] cpus, and whether an llm worker runs (`LLMSettings.worker_wanted`: enabled, model there,
        llama.cpp installed)."""
        server = getattr(settings, "server", None)
        inference = getattr(settings, "inference", None)

        def ints(v: Any) -> list[int] | None:
            return [int(x) for x in v] if v is not None else None

        model_workers = getattr(inference, "workers", None)
        if inference is not None and (
            getattr(inference, "enabled", True) is False or getattr(inference, "mode", "process") == "inline"
        ):
            model_workers = 0
        raw = getattr(inference, "worker_cpus", None)
        per_worker: list[list[int]] | None = None
        if raw is not None:
            per_worker = [[int(c) for c in g] if isinstance(g, list | tuple) else [int(g)] for g in raw]
        llm = getattr(settings, "llm", None)
        wanted = getattr(llm, "worker_wanted", None)
        data_dir = getattr(settings, "data_dir", None)
        return cls(
            llm=bool(wanted(data_dir)) if callable(wanted) and data_dir is not None else False,
            llm_cpus=ints(getattr(llm, "cpus", None)),
            http_workers=getattr(server, "workers", None),
            worker_cpus=ints(getattr(server, "worker_cpus", None)),
            pin=False if getattr(server, "pin_cpus", True) is False else None,
            event_loop=getattr(server, "loop", None),
            backlog=getattr(server, "backlog", None),
            model_workers=model_workers,
            model_worker_cpus=per_worker if model_workers != 0 else None,
        )
