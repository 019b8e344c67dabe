"""The supervisor's live process table as a small JSON file (docs/architecture.md §1).

An http worker cannot see the supervisor's plan: which side processes run, on which cores, with what
pid, since when, restarted how often, ready or not. The supervisor therefore writes this table to
`<data_dir>/processes.json` whenever a child is spawned, reaped or becomes ready, and tells every child
where it is (`XC_PROCESS_TABLE`). The file is replaced atomically (a temporary file in the same folder,
then `os.replace`), so a reader sees the old table or the new one, never half of one. Standard library
only: the supervisor imports this and nothing heavier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("xcstack.supervisor")

STATUS_ENV = "XC_PROCESS_TABLE"  # set by the supervisor in every child's environment: the table's path
STATUS_FILE = "processes.json"
VERSION = 1
# the llama.cpp worker's decode threads (xcstack.llm.worker.THREADS_ENV; not imported: the supervisor stays light)
LLM_THREADS_ENV = "XC_LLM_THREADS"
# ONNX Runtime sessions in a model worker run one intra-op thread (inference/runtime.py)
MODEL_WORKER_THREADS = 1
PLAN_FIELDS = ("usable_cpus", "cpu_budget", "cpu_slots", "pin", "http_workers", "model_workers", "io_cores",
               "compute_cores", "shared_cores", "event_loop", "llm_cpus", "llm_threads", "warnings")


def status_path(data_dir: Path) -> Path:
    return data_dir / STATUS_FILE


def plan_summary(plan: Any) -> dict[str, Any] | None:
    """The tuning plan's figures the overview shows (None without a plan: the probe did not import)."""
    if plan is None:
        return None
    return {name: getattr(plan, name) for name in PLAN_FIELDS if hasattr(plan, name)}


def planned_threads(kind: str, cpus: Sequence[int], env: Mapping[str, str]) -> int | None:
    """The compute threads a side process runs with, as planned; None where no figure is planned (an
    http worker's event loop, the HSM owner, Milvus Lite)."""
    if kind == "llm-worker":
        raw = env.get(LLM_THREADS_ENV, "")
        return int(raw) if raw.isdigit() else (len(cpus) or None)  # else one per core (llm/worker.py)
    if kind == "model-worker":
        return MODEL_WORKER_THREADS
    return None


def write_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace `path` with `doc` as JSON: a temporary file in the same folder, fsync'd, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StatusWriter:
    """Writes the supervisor's process table; a failed write is logged (once per cause), never raised:
    the table is for people, the process tree must not depend on it."""

    def __init__(self, path: Path, plan: Any = None, clock: Any = time.time) -> None:
        self.path = path
        self.plan = plan_summary(plan)
        self.clock = clock
        self.started_at = clock()
        self._failed: str | None = None

    def document(self, processes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"version": VERSION, "updated_at": self.clock(), "cpu_count": os.cpu_count() or 0,
                "supervisor": {"pid": os.getpid(), "started_at": self.started_at},
                "plan": self.plan, "processes": list(processes)}

    def publish(self, processes: Sequence[Mapping[str, Any]]) -> bool:
        try:
            write_atomic(self.path, self.document(processes))
        except (OSError, TypeError, ValueError) as exc:
            if self._failed != repr(exc):
                log.warning("cannot write the process table %s: %s", self.path, exc)
                self._failed = repr(exc)
            return False
        self._failed = None
        return True

    def remove(self) -> None:
        """At exit: no table outlives the tree it describes."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def read_table(path: Path) -> dict[str, Any]:
    """The table as written (raises OSError or ValueError for a missing or damaged file)."""
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version-{VERSION} process table")
    return data
