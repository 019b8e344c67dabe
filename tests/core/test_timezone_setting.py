"""[usage] timezone and [console] timezone share one check (xcstack.timezones): a name ZoneInfo cannot load
fails the config at load time with the key and the reason, never with a traceback at the first date."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcstack.config import ConfigError, load_settings


@pytest.mark.parametrize("section", ["usage", "console"])
@pytest.mark.parametrize("zone", ["Nope/Nowhere", "../etc/passwd", "", "Asia"])
def test_unknown_zone_is_a_config_error(tmp_path: Path, section: str, zone: str) -> None:
    # "Asia" is a folder of the zone database: ZoneInfo raises IsADirectoryError there on Python 3.11
    cfg = tmp_path / "xcstack.toml"
    cfg.write_text(f'[{section}]\ntimezone = "{zone}"\n')
    with pytest.raises(ConfigError, match=rf"{section}\.timezone: .*unknown time zone"):
        load_settings(cfg)


@pytest.mark.parametrize("section", ["usage", "console"])
def test_known_zone_is_kept(tmp_path: Path, section: str) -> None:
    cfg = tmp_path / "xcstack.toml"
    cfg.write_text(f'[{section}]\ntimezone = "Europe/Berlin"\n')
    assert getattr(load_settings(cfg), section).timezone == "Europe/Berlin"
    assert getattr(load_settings(), section).timezone == "Asia/Shanghai"
