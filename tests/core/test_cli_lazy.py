"""The CLI starts with parts missing (issue 13, item 3): subcommands register from light modules and
import their capability only when run, so `xcstack --help` and `xcstack doctor` work while an optional
native package does not import, and doctor names it, says why, and gives the fix.

"Does not import" is made real, not mocked: a `sitecustomize` on PYTHONPATH installs a meta path
finder that refuses the listed top-level modules (in the CLI process and in doctor's import children
alike), exactly as when the package is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BLOCKER = '''
import os, sys
from importlib.abc import MetaPathFinder

_BLOCKED = set(filter(None, os.environ.get("XC_TEST_BLOCK_IMPORTS", "").split(",")))


class _Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''

# Modules a parser build must not load: native packages and the capabilities that need them.
HEAVY = ("numpy", "onnxruntime", "gmssl_pyx", "gmalglib", "cryptography", "pymilvus", "milvus_lite", "starlette",
         "aiohttp", "orjson", "uvloop", "granian", "tokenizers", "PyKCS11", "xcstack.crypto.primitives.sm2",
         "xcstack.db.bridge", "xcstack.gateway.mock_upstream", "xcstack.security.secretbox")


def xcstack(tmp_path: Path, blocked: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XC_")}
    path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH", "")]))
    env.update(PYTHONPATH=path, XC_TEST_BLOCK_IMPORTS=blocked)
    return subprocess.run([sys.executable, "-m", "xcstack", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path, check=False)  # fmt: skip


def test_building_the_parser_imports_no_capability() -> None:
    code = ("import sys; from xcstack.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"imported while building the parser: {out.stdout.strip()}"


def test_blocker_really_blocks(tmp_path: Path) -> None:
    """The shim is what the tests below rely on: the module must be unimportable under it."""
    shim_run = xcstack(tmp_path, "gmssl_pyx", "--help")
    assert shim_run.returncode == 0, shim_run.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shim"), XC_TEST_BLOCK_IMPORTS="gmssl_pyx")
    r = subprocess.run([sys.executable, "-c", "import gmssl_pyx"], capture_output=True, text=True, env=env,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 1 and "No module named 'gmssl_pyx'" in r.stderr


@pytest.mark.parametrize(
    ("module", "dist", "fix_words"),
    [
        ("gmssl_pyx", "gmssl-pyx", ("pip install gmssl-pyx", "gmalglib")),
        ("onnxruntime", "onnxruntime", ("pip install onnxruntime", "[inference] enabled = false")),
        ("pymilvus", "pymilvus", ("pip install pymilvus", "grpcio")),
    ],
)
def test_help_and_doctor_run_with_a_native_package_missing(tmp_path: Path, module: str, dist: str,
                                                           fix_words: tuple[str, ...]) -> None:  # fmt: skip
    r = xcstack(tmp_path, module, "--help")
    assert r.returncode == 0, r.stderr
    for verb in ("doctor", "serve", "db", "key", "model", "sbom", "user", "mock-upstream"):
        assert verb in r.stdout, verb
    assert "unavailable" not in r.stderr, r.stderr

    r = xcstack(tmp_path, module, "doctor", "--json", "--no-check-flags")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    problems = {p["package"]: p for p in data["problems"]}
    assert dist in problems, data["problems"]
    p = problems[dist]
    assert p["status"] == "missing" and module in p["reason"], p
    for words in fix_words:
        assert words in p["fix"], p
    pkgs = {x["name"]: x for x in data["report"]["python"]["packages"]}
    assert pkgs[dist]["present"] is False and pkgs[dist]["status"] == "missing"
    # everything else still imports in its child: only the blocked package is reported
    others = [x for x in data["problems"] if x["module"] != module]
    assert others == [], others
    if module == "onnxruntime":  # the plan leaves out what cannot work
        assert data["plan"]["model_workers"] == 0
        assert any("onnxruntime is not importable" in w for w in data["plan"]["warnings"])


@pytest.mark.parametrize(
    ("module", "argv", "fix"),
    [
        ("onnxruntime", ("model", "import-default"), "fix: pip install onnxruntime"),
        ("cryptography", ("db", "queries"), "fix: pip install cryptography"),
    ],
)
def test_a_command_that_needs_the_missing_package_says_so(tmp_path: Path, module: str, argv: tuple[str, ...],
                                                          fix: str) -> None:  # fmt: skip
    """A command whose capability needs the package fails with exit 3, naming it and the fix (no traceback)."""
    r = xcstack(tmp_path, module, *argv)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert f"xcstack {argv[0]}:" in r.stderr and f"No module named '{module}" in r.stderr and fix in r.stderr
    assert "xcstack doctor" in r.stderr
    assert not (tmp_path / "var" / "models").exists() or not any((tmp_path / "var" / "models").iterdir())


def test_mock_upstream_fault_names_match_the_mock() -> None:
    from xcstack.gateway import cli
    from xcstack.gateway.mock_upstream import FAULTS

    assert cli.FAULTS == FAULTS


def test_config_option_after_the_subcommand(tmp_path: Path) -> None:
    """`xcstack serve --config F` works like `xcstack --config F serve` (issue 15): every subcommand takes it."""
    from xcstack.cli import build_parser

    cfg = tmp_path / "x.toml"
    cfg.write_text("[server]\nport = 9123\n")
    parser = build_parser()
    for argv in (["serve", "--config", str(cfg)], ["--config", str(cfg), "serve"],
                 ["audit", "verify", "--config", str(cfg)], ["config", "show", "--config", str(cfg)]):
        assert parser.parse_args(argv).config == str(cfg), argv
    assert parser.parse_args(["serve"]).config is None  # the global default stands
    out = subprocess.run([sys.executable, "-m", "xcstack", "config", "show", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"port": 9123' in out.stdout, out.stderr
