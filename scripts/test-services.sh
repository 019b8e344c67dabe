#!/usr/bin/env bash
# Prepare every service the tests need that the machine may not already run. Idempotent.
# The machine kind starts PostgreSQL, MariaDB and Redis before a session; this script restarts
# any that is down, then runs each scripts/services/*.sh (extra services owned by capabilities).
set -euo pipefail
cd "$(dirname "$0")/.."

pg_up()    { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
maria_up() { mariadb -uroot -h127.0.0.1 -P3306 -e 'select 1' >/dev/null 2>&1; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }

wait_for() { local what=$1 check=$2; for _ in $(seq 1 60); do $check && return 0; sleep 0.5; done; echo "$what did not come up" >&2; return 1; }

if command -v pg_ctlcluster >/dev/null && ! pg_up; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  wait_for postgresql pg_up
fi
if command -v mariadbd >/dev/null && ! maria_up; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_for mariadb maria_up
fi
if command -v redis-server >/dev/null && ! redis_up; then
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for redis redis_up
fi

for s in scripts/services/*.sh; do
  [ -e "$s" ] || continue
  echo "services: $s"
  bash "$s"
done
