#!/usr/bin/env bash
# db capability test services (idempotent): the MariaDB client headers and the `mysqlclient` C
# driver (an optional faster profile for the MySQL family). Its tests skip when it is missing, so
# this is best-effort: a failure here never fails `make test`.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || exit 0
"$PY" -c "import MySQLdb" 2>/dev/null && { echo "db services: mysqlclient present"; exit 0; }
if ! dpkg -s libmariadb-dev >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends libmariadb-dev pkg-config >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 \
         && $SUDO apt-get install -y -q --no-install-recommends libmariadb-dev pkg-config >/dev/null 2>&1; } \
    || { echo "db.sh: libmariadb-dev not installed; mysqlclient tests will skip" >&2; exit 0; }
fi
"$PY" -m pip install -q 'mysqlclient>=2.2' || echo "db.sh: mysqlclient not installed; its tests will skip" >&2
exit 0
