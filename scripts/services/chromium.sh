#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it with executable_path=/usr/bin/chromium;
# Playwright's own browser download is not used).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
