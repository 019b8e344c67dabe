"""Recommended kernel settings for a gateway host, as a sysctl.d file body (`xcstack doctor --sysctl`).

Every value is at least the recommendation and never lower than what the host already has, so
installing the file can only raise limits. sysctl.d does not allow trailing comments, so each
setting's current value and reason sit on the comment line above it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from xcstack.platform.probe import PlatformReport


@dataclass
class SysctlAdvice:
    key: str
    current: str | None
    recommended: str
    ok: bool  # the current value already satisfies the recommendation
    why: str


# key -> (minimum, why)
_MINIMUMS: tuple[tuple[str, int, str], ...] = (
    ("net.core.somaxconn", 4096, "cap on every listen() backlog; lower values drop connection bursts"),
    ("net.ipv4.tcp_max_syn_backlog", 8192, "half-open (SYN_RECV) connections queued during bursts"),
    ("net.core.netdev_max_backlog", 16384, "packets queued per CPU before the network stack drops them"),
    ("fs.file-max", 1048576, "system-wide open files (sockets to clients, upstreams and databases)"),
    ("fs.nr_open", 1048576, "the largest LimitNOFILE / ulimit -n a process may be given"),
    ("fs.epoll.max_user_watches", 1048576, "epoll registrations per user (one per open connection)"),
)
PORT_RANGE = (10240, 65535)
PORT_RANGE_MIN_SIZE = 50000


def _int(v: str | None) -> int | None:
    try:
        return int(v.split()[0]) if v else None
    except ValueError:
        return None


def sysctl_advice(report: PlatformReport) -> list[SysctlAdvice]:
    cur = report.limits.sysctls
    out: list[SysctlAdvice] = []
    for key, minimum, why in _MINIMUMS:
        have = cur.get(key)
        n = _int(have)
        ok = n is not None and n >= minimum
        rec = str(max(n or 0, minimum))
        out.append(SysctlAdvice(key, have, rec, ok, why))
    have = cur.get("net.ipv4.ip_local_port_range")
    lo_hi = report.limits.ip_local_port_range
    if lo_hi:
        lo, hi = min(lo_hi[0], PORT_RANGE[0]), max(lo_hi[1], PORT_RANGE[1])
        ok = lo_hi[1] - lo_hi[0] + 1 >= PORT_RANGE_MIN_SIZE
        rec = f"{lo_hi[0]} {lo_hi[1]}" if ok else f"{lo} {hi}"
    else:
        ok, rec = False, f"{PORT_RANGE[0]} {PORT_RANGE[1]}"
    out.append(
        SysctlAdvice(
            "net.ipv4.ip_local_port_range", have, rec, ok,
            "ephemeral ports for outgoing connections (LLM upstreams, databases); keep listening ports below it",
        )
    )  # fmt: skip
    have = cur.get("net.ipv4.tcp_tw_reuse")
    out.append(
        SysctlAdvice(
            "net.ipv4.tcp_tw_reuse", have, "1", have == "1",
            "reuse TIME_WAIT sockets for new outgoing connections (2 = loopback only)",
        )
    )  # fmt: skip
    return out


def render_sysctl(report: PlatformReport, now: _dt.datetime | None = None) -> str:
    when = (now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    host = report.hostname or "?"
    kern = report.os.kernel or "?"
    lines = [
        "# /etc/sysctl.d/90-xcstack.conf: kernel settings recommended by `xcstack doctor --sysctl`",
        f"# host {host} ({report.os.name} {report.os.version_id}, kernel {kern}), generated {when}",
        "# install: sudo install -m 0644 this-file /etc/sysctl.d/90-xcstack.conf && sudo sysctl --system",
        "# No value is lower than the host's current one.",
        "",
    ]
    for a in sysctl_advice(report):
        state = "ok, kept" if a.ok else "raise"
        lines.append(f"# {a.key}: current {a.current if a.current is not None else 'unknown'} ({state}); {a.why}")
        lines.append(f"{a.key} = {a.recommended}")
        lines.append("")
    lim = report.limits
    soft = "unlimited" if lim.nofile_soft == -1 else lim.nofile_soft
    hard = "unlimited" if lim.nofile_hard == -1 else lim.nofile_hard
    lines.append(
        f"# Not a sysctl: open files per process (ulimit -n) is soft {soft} / hard {hard}; set LimitNOFILE=1048576 "
        "in the xcstack systemd unit (or `nofile` in /etc/security/limits.d)."
    )
    return "\n".join(lines) + "\n"
