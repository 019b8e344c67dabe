"""Loading settings keeps no class-level state: a `Settings()` built while a TOML file is being
loaded (here: by a plugin package that the validation of `server.plugins` imports) does not see it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xcstack.config import Settings, load_settings


def test_settings_built_during_a_load_do_not_see_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "xc_cfg_probe_pkg"
    pkg.mkdir()
    # importing the package (find_spec of its submodule) builds a Settings() of its own
    (pkg / "__init__.py").write_text("from xcstack.config import Settings\nSEEN = Settings().data_dir\n")
    (pkg / "cap.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("XC_DATA_DIR", raising=False)
    config = tmp_path / "xc.toml"
    config.write_text(f'data_dir = "{tmp_path / "from-file"}"\n[server]\nplugins = ["xc_cfg_probe_pkg.cap"]\n')
    try:
        loaded = load_settings(config)
        assert loaded.data_dir == tmp_path / "from-file" and loaded.server.plugins == ["xc_cfg_probe_pkg.cap"]
        assert sys.modules["xc_cfg_probe_pkg"].SEEN == Path("var")  # not the file being loaded
    finally:
        sys.modules.pop("xc_cfg_probe_pkg", None)
    assert type(loaded) is Settings and Settings().data_dir == Path("var")
