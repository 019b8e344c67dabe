#!/usr/bin/env bash
# crypto capability test services (idempotent):
#  - SoftHSM2 (Debian `softhsm2`): the real PKCS#11 token the pkcs11 backend is tested against;
#  - OpenSSL 3 headers (`libssl-dev`): the software SDF test library (C) links libcrypto's SM2/SM3/SM4;
#  - gcc to build that library (tests compile it at session start-up, never committed as a binary).
set -euo pipefail

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || [ -e /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so ] \
  || ls /usr/lib/*/softhsm/libsofthsm2.so >/dev/null 2>&1 || need+=(softhsm2)
[ -e /usr/include/openssl/evp.h ] || need+=(libssl-dev)
command -v gcc >/dev/null || need+=(gcc)

if [ ${#need[@]} -eq 0 ]; then
  echo "crypto services: softhsm2, libssl-dev, gcc present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
echo "crypto services: installed ${need[*]}"
