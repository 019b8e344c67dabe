"""`xcstack doctor`: table, --json, --root, --sysctl, config overrides, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.cli import main

from .helpers import fx


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_doctor_registered_in_cli_modules() -> None:
    from xcstack.cli import CLI_MODULES

    assert "xcstack.platform.cli" in CLI_MODULES


def test_doctor_table_for_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor", "--root", str(fx("kunpeng920-kylin-v10")))
    assert rc == 0
    for needle in ("[platform]", "[plan]", "[build]", "[warnings]", "HiSilicon Kunpeng (信创)",
                   "Kunpeng 920 (TSV110)", "Kylin V10", "lsb-release (os-release ID=debian)",
                   "http workers", "2 on cpus 0 4", "-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110",
                   "somaxconn=128", "io_uring", "not probed (not this machine)"):  # fmt: skip
        assert needle in out, needle
    assert "check " not in out  # no compiler check for another machine's flags


def test_doctor_json_for_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor", "--json", "--root", str(fx("phytium-d2000-kylin-v10")))
    assert rc == 0
    data = json.loads(out)
    assert data["report"]["cpu"]["vendor"] == "phytium"
    assert data["report"]["os"]["id"] == "kylin"
    assert data["plan"]["build"]["cflags"] == "-O3 -march=armv8-a+crc"
    assert data["plan"]["http_cpus"] == [[0], [1]]
    assert data["flag_checks"] == []
    assert {a["key"] for a in data["sysctl"]} >= {"net.core.somaxconn", "fs.file-max"}


def test_doctor_live_table_and_flag_check(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor")
    assert rc == 0
    assert "this machine" in out and "io_uring" in out and "[python]" in out
    if "check " in out:
        assert "REJECTED" not in out, out


def test_doctor_config_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "xc.toml"
    cfg.write_text("[server]\nworkers = 3\nworker_cpus = [1, 2]\npin_cpus = true\n")
    rc, out, _ = run(capsys, "--config", str(cfg), "doctor", "--json", "--root", str(fx("amd-epyc-ubuntu2204")))
    assert rc == 0
    plan = json.loads(out)["plan"]
    assert plan["http_workers"] == 3
    assert plan["http_cpus"] == [[1], [2], [1]]
    assert 1 not in [c for g in plan["model_cpus"] for c in g]
    assert {"worker_cpus", "http_workers"} <= set(plan["overridden"])
    cfg.write_text("[server]\npin_cpus = false\n")
    rc, out, _ = run(capsys, "--config", str(cfg), "doctor", "--json", "--root", str(fx("amd-epyc-ubuntu2204")))
    assert json.loads(out)["plan"]["pin"] is False


def test_doctor_bad_config_and_bad_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "xc.toml"
    cfg.write_text("[server]\nworkers = 0\n")
    rc, _, err = run(capsys, "--config", str(cfg), "doctor")
    assert rc == 2 and "server.workers" in err
    rc, _, err = run(capsys, "doctor", "--root", str(tmp_path / "nope"))
    assert rc == 2 and "not a directory" in err


def test_doctor_empty_root_degrades(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "doctor", "--json", "--root", str(tmp_path), "--machine", "aarch64")
    assert rc == 0
    data = json.loads(out)
    assert data["report"]["arch"] == "aarch64"
    assert data["report"]["cpu"]["vendor"] == "generic"
    assert data["report"]["os"]["id"] == "unknown"
    assert data["plan"]["http_workers"] == 1


def parse_sysctl(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(" = ")
        assert sep, f"not a sysctl.d line: {line!r}"
        assert "#" not in value  # sysctl.d has no trailing comments
        out[key] = value
    return out


def test_doctor_sysctl_raises_never_lowers(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor", "--sysctl", "--root", str(fx("kunpeng920-kylin-v10")))
    assert rc == 0
    vals = parse_sysctl(out)
    assert vals["net.core.somaxconn"] == "4096"
    assert "# net.core.somaxconn: current 128 (raise)" in out
    assert vals["fs.file-max"] == "6553600"  # already above 1048576: kept
    assert vals["net.ipv4.ip_local_port_range"] == "10240 65535"
    assert vals["net.ipv4.tcp_max_syn_backlog"] == "8192"
    assert vals["fs.epoll.max_user_watches"] == "3269312"
    assert "LimitNOFILE" in out and "soft 1024 / hard 524288" in out
    # a host that already exceeds every value keeps its own values
    rc, out, _ = run(capsys, "doctor", "--sysctl", "--root", str(fx("amd-epyc-ubuntu2204")))
    vals = parse_sysctl(out)
    assert vals["net.ipv4.ip_local_port_range"] == "1024 65535"
    assert vals["net.ipv4.tcp_tw_reuse"] == "1"
    assert "(raise)" in out  # syn backlog 4096 < 8192


def test_doctor_sysctl_live(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor", "--sysctl")
    assert rc == 0
    vals = parse_sysctl(out)
    current = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(vals["net.core.somaxconn"]) == max(current, 4096)


def test_xcstack_doctor_command_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xcstack", "doctor", "--json", "--no-check-flags"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["report"]["live"] is True
    assert data["report"]["io_uring"]["status"] in {"available", "disabled", "blocked", "unsupported"}
