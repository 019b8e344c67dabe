"""Kernel and limits advice: settings that silently cost connections under load, named with their fix.

Advice only: the plan never changes a limit, it tells the operator which one to raise.
"""

from __future__ import annotations

from xcstack.platform.planning.findings import Findings
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.probe import PlatformReport

RECOMMENDED_NOFILE = 65536
RECOMMENDED_SOMAXCONN = 4096


def kernel_advice(report: PlatformReport, ov: PlanOverrides, found: Findings) -> None:
    """Phase: warn about somaxconn, the listen backlog and the open-files limit; note io_uring's state."""
    lim = report.limits
    if lim.somaxconn is not None and lim.somaxconn < RECOMMENDED_SOMAXCONN:
        found.warnings.append(
            f"net.core.somaxconn={lim.somaxconn} < {RECOMMENDED_SOMAXCONN}: bursts of connections are dropped "
            "(xcstack doctor --sysctl)"
        )
    if ov.backlog is not None and lim.somaxconn is not None and ov.backlog > lim.somaxconn:
        found.warnings.append(f"server.backlog={ov.backlog} is silently capped by net.core.somaxconn={lim.somaxconn}")
    if lim.nofile_soft is not None and 0 <= lim.nofile_soft < RECOMMENDED_NOFILE:
        found.warnings.append(
            f"open files limit (ulimit -n) {lim.nofile_soft} < {RECOMMENDED_NOFILE}: raise LimitNOFILE in the "
            "systemd unit or ulimit -n"
        )
    io_u = report.io_uring
    if io_u.status not in ("available", "not_probed"):
        found.notes.append(f"io_uring {io_u.status}: {io_u.reason} (servers use epoll)")
