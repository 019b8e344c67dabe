"""The db package's shape (issue 14 item 4): pool, database and bridge modules, one module per dialect.

The profile registry loads no database driver (each dialect imports its driver on first use only).
Private names and import cycles are checked for the whole source in tests/core/test_import_cycles.py.
"""

from __future__ import annotations

import subprocess
import sys

DRIVERS = ("psycopg", "pymysql", "MySQLdb", "dmPython", "ksycopg2", "DbtPyDbi", "DbtPy")


def test_the_profile_registry_imports_no_driver() -> None:
    code = (
        "import sys; from xcstack.db.profiles import PROFILES, get_profile; "
        "[get_profile(n) for n in PROFILES]; "
        f"print(','.join(m for m in {DRIVERS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
