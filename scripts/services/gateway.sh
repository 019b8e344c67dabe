#!/usr/bin/env bash
# Gateway capability: wrk, the HTTP load generator bench/gateway.py prefers (it falls back to a
# Python load client without it). Tests do not need it. Idempotent and best-effort.
set -uo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
$SUDO apt-get install -y -q wrk >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q wrk >/dev/null 2>&1; } || echo "gateway.sh: wrk not installed (bench/gateway.py will use its Python load client)" >&2
exit 0
