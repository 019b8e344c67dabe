"""Bad security config fails at start with the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcstack.config import ConfigError, load_settings


@pytest.mark.parametrize(("security", "key"), [
    ({"pbkdf2_iterations": 1000}, "security.pbkdf2_iterations"),
    ({"password_min_length": 4}, "security.password_min_length"),
    ({"password_min_classes": 2}, "security.password_min_classes"),
    ({"lockout_threshold": 0}, "security.lockout_threshold"),
    ({"redis_url": "http://x"}, "security.redis_url"),
    ({"public_paths": ["healthz"]}, "security.public_paths"),
    ({"session_idle_s": 3600, "session_absolute_s": 60}, "security"),
    ({"audit": {"retention_days": 90}}, "security.audit.retention_days"),
    ({"audit": {"export_syslog": "udp://x:514"}}, "security.audit.export_syslog"),
    ({"audit": {"node": "bad node"}}, "security.audit.node"),
    ({"unknown": 1}, "security.unknown"),
])
def test_invalid_security_config_names_the_key(tmp_path: Path, security: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, data_dir=tmp_path, security=security)
    assert key in str(exc.value)


def test_defaults_are_the_mlps_l3_ones(tmp_path: Path) -> None:
    s = load_settings(None, data_dir=tmp_path).security
    assert s.enabled and s.totp_required and not s.metrics_public
    pw = (s.password_min_length, s.password_min_classes, s.password_history, s.password_max_age_days)
    assert pw == (12, 3, 5, 90)
    assert (s.lockout_threshold, s.lockout_s, s.session_idle_s, s.session_absolute_s) == (5, 900, 900, 43200)
    assert s.pbkdf2_iterations >= 100_000 and s.audit.retention_days >= 180
