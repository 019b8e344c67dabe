#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it with executable_path=/usr/bin/chromium;
# Playwright's own browser download is not used), and Noto CJK so the screenshots show Chinese glyphs.
set -euo pipefail
have_fonts() { fc-list :lang=zh 2>/dev/null | grep -qi "noto.*cjk"; }
if [ -x /usr/bin/chromium ] && have_fonts; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
/usr/bin/chromium --version
