#!/usr/bin/env bash
# make test-arm64: the documented air-gapped install (docs/deployment.md §5) on an emulated arm64 Debian 12.
#   sudo make test-arm64            (11-21 min measured; root: debootstrap, chroot, mounts, binfmt)
# 1. host tools from Debian: qemu-user-static, binfmt-support, debootstrap (apt-get); binfmt_misc for aarch64
# 2. an arm64 Debian root file system (debootstrap, with the build prerequisites the docs name)
# 3. `make wheelhouse PLATFORM=aarch64` for the rootfs's own Python version, copied in
# 4. the install block of docs/deployment.md §5, run in the chroot WITHOUT network (unshare -n)
# 5. `xcstack doctor --json`; `import onnxruntime` alone (a crash is reported with its signal, and retried
#    with an aarch64 /proc/cpuinfo to show whose it is); the SM2 backends
# 6. `xcstack serve` with embedded defaults (inference off when ONNX Runtime crashes), /readyz = 200,
#    SM2 sign + verify through the API (scripts/arm64/api_check.py); then cleanup (KEEP=1 keeps the rootfs)
# Env: ARM64_WORK (/var/tmp/xcstack-arm64), SUITE (bookworm), MIRROR (http://deb.debian.org/debian),
#      EXTRAS (postgres,redis,kingbase,pkcs11,sbom), PORT (18765), KEEP=1, READY_TIMEOUT (900 s).
# The result (date, times, sizes) is printed and written to $ARM64_WORK/result.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
work=${ARM64_WORK:-/var/tmp/xcstack-arm64}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
extras=${EXTRAS:-postgres,redis,kingbase,pkcs11,sbom}
port=${PORT:-18765}
ready_timeout=${READY_TIMEOUT:-900}
# the build prerequisites docs/deployment.md names for Debian (C/C++ sdists: PyKCS11, the SM2 backend's)
target_pkgs=python3,python3-venv,python3-dev,gcc,g++,libc6-dev
root=$work/rootfs
result=$work/result.txt
serve_pid=

[ "$(id -u)" = 0 ] || { echo "test-arm64: needs root (debootstrap, chroot, mounts): sudo make test-arm64" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || echo "test-arm64: host is $(uname -m), not x86_64: emulation may not be used" >&2

t_all=$(date +%s)
mkdir -p "$work"
rm -f "$work"/*.log "$work"/*.json "$work"/*.txt  # the last run's
: > "$result"
say() { echo "$*" | tee -a "$result"; }
t0=0
begin() { t0=$(date +%s); echo "== $* ($(date -u +%H:%M:%S))"; }
took() { local s=$(( $(date +%s) - t0 )); say "$(printf '%-34s %4d s' "$1" "$s")"; }
mib() { du -smx "$1" 2>/dev/null | cut -f1; }  # -x: not the proc/sys/dev mounts

unmount_all() {  # every mount under the rootfs, deepest first
  local m
  for m in $(findmnt -rn -o TARGET | grep -E "^$root(/|$)" | sort -r); do umount -l "$m" || true; done
}
cleanup() {
  local rc=$?
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM -- "-$serve_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$serve_pid" 2>/dev/null || true
  fi
  unmount_all
  if [ "${KEEP:-0}" != 1 ] && [ -d "$root" ]; then
    if findmnt -rn -o TARGET | grep -qE "^$root(/|$)"; then
      echo "test-arm64: something is still mounted under $root: not deleting it" >&2
    else
      rm -rf --one-file-system "$root" "$work/wheelhouse"
    fi
  fi
  say "total                              $(( $(date +%s) - t_all )) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

say "make test-arm64 $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m) $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)$([ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || echo ' + uncommitted changes')"

# 1. host tools
begin "host tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || { echo "test-arm64: binfmt for qemu-aarch64 is not enabled" >&2; exit 1; }
say "emulator: $(qemu-aarch64-static --version | head -1)"
took "host tools"

# 2. rootfs
begin "debootstrap $suite arm64"
unmount_all
rm -rf --one-file-system "$root"
debootstrap --arch=arm64 --variant=minbase --foreign --include="$target_pkgs" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1
took "debootstrap (first stage)"
begin "debootstrap second stage (emulated)"
chroot "$root" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
took "debootstrap (second stage)"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
pyver=$(in_root python3 -c 'import platform; print(platform.python_version())')
glibc=$(in_root python3 -c 'import platform; print(platform.libc_ver()[1])')
say "target: $(in_root uname -m), Debian $(cat "$root/etc/debian_version"), Python $pyver, glibc $glibc, gcc $(in_root gcc -dumpfullversion)"
say "rootfs before install: $(mib "$root") MiB"

# 3. wheelhouse for that Python, built on this host as an operator would, copied over
begin "wheelhouse"
rm -rf "$work/wheelhouse"
PYTHON_VERSION=$pyver EXTRAS=$extras bash scripts/wheelhouse.sh aarch64 "$work/wheelhouse" 2>&1 \
  | grep -v "^WARNING: Location" | tee "$work/wheelhouse.log" | grep '^wheelhouse:'
[ "${PIPESTATUS[0]}" = 0 ] || { echo "test-arm64: the wheelhouse is not complete" >&2; exit 1; }
took "make wheelhouse PLATFORM=aarch64"
say "wheelhouse: $(find "$work/wheelhouse" -maxdepth 1 -type f | wc -l) files, $(mib "$work/wheelhouse") MiB;" \
    "sdists: $(cd "$work/wheelhouse" && ls -- *.tar.gz *.zip 2>/dev/null | tr '\n' ' ')"
cp -r "$work/wheelhouse" "$root/opt/wheelhouse"

# 4. the install, exactly the block of docs/deployment.md that follows `<!-- test-arm64: install -->`
block=$(awk '/<!-- test-arm64: install -->/{f=1; next} f && /^```sh/{g=1; next} g && /^```/{exit} g' docs/deployment.md)
[ -n "$block" ] || { echo "test-arm64: no install block in docs/deployment.md" >&2; exit 1; }
printf 'set -eux\nWH=/opt/wheelhouse\nEXTRAS=%s\n%s\n' "$extras" "$block" > "$root/opt/install.sh"
begin "offline install (emulated)"
if ! unshare --net chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
      bash /opt/install.sh > "$work/install.log" 2>&1; then
  took "offline install: FAILED"
  grep -E "error|Error|ERROR|Failed" "$work/install.log" | tail -25 | tee -a "$result"
  exit 1
fi
took "offline install (no network)"
say "installed venv: $(mib "$root/opt/xcstack/venv") MiB; rootfs after install: $(mib "$root") MiB"
grep -E "^Successfully (built|installed)|Created wheel for" "$work/install.log" | cut -c1-300 | tee -a "$result" || true
xc=/opt/xcstack/venv/bin/xcstack

# 5. doctor, and ONNX Runtime alone
begin "xcstack doctor --json"
in_root env XC_DATA_DIR=/var/lib/xcstack "$xc" doctor --json > "$work/doctor.json" 2>"$work/doctor.err" \
  || { cat "$work/doctor.err"; took "xcstack doctor --json: FAILED"; exit 1; }
took "xcstack doctor --json"
python3 - "$work/doctor.json" <<'PYEOF' | tee -a "$result"
import json, sys
d = json.load(open(sys.argv[1]))
r, p = d.get("report", {}), d.get("plan", {})
cpu = r.get("cpu") or {}
print(f"doctor: arch {r.get('arch')}, cpu {cpu.get('vendor_name', cpu.get('vendor'))} {cpu.get('model')}, "
      f"emulation {json.dumps(r.get('emulation'), ensure_ascii=False)}")
print(f"doctor: plan: http_workers {p.get('http_workers')}, model_workers {p.get('model_workers')}, "
      f"onnxruntime {json.dumps(p.get('onnxruntime'), ensure_ascii=False)}")
for line in d.get("problems", []):
    print(f"doctor: problem: {json.dumps(line, ensure_ascii=False)}")
PYEOF
# a one-layer ONNX model made here (when this host's Python has `onnx`) to see ORT compute, not only import
hostpy=python3
[ -x .venv/bin/python ] && hostpy=.venv/bin/python
smoke=(echo "no ONNX Runtime smoke run: this host's Python has no onnx package to make the model")
if "$hostpy" scripts/arm64/ort_smoke.py make "$root/opt/ort-smoke.onnx" 2>/dev/null; then
  cp scripts/arm64/ort_smoke.py "$root/opt/"
  smoke=(in_root /opt/xcstack/venv/bin/python /opt/ort_smoke.py run /opt/ort-smoke.onnx)
fi
ort_rc=0
in_root /opt/xcstack/venv/bin/python -X faulthandler -c 'import onnxruntime; print(onnxruntime.__version__)' \
  > "$work/ort.log" 2>&1 || ort_rc=$?
inference=true
if [ "$ort_rc" = 0 ]; then
  say "onnxruntime alone: imports ($(tail -1 "$work/ort.log")); $("${smoke[@]}" 2>&1 | tail -1)"
else
  sig=""
  [ "$ort_rc" -gt 128 ] && sig=" = signal $((ort_rc - 128)) ($(kill -l $((ort_rc - 128))))"
  say "onnxruntime alone: \`python -c 'import onnxruntime'\` exit $ort_rc$sig under $(qemu-aarch64-static --version | head -1)"
  grep -m3 -E "Fatal|File" "$work/ort.log" | sed 's/^/    /' | tee -a "$result" || true
  inference=false
  # qemu-user 7.2 shows the guest the HOST's /proc/cpuinfo (x86): the same import with an aarch64 one
  # (a Kunpeng 920's, bind-mounted over it) tells the emulator's part from ONNX Runtime's
  mount --bind scripts/arm64/cpuinfo-kunpeng920 "$root/proc/cpuinfo"
  ort2_rc=0
  in_root /opt/xcstack/venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)' \
    > "$work/ort-cpuinfo.log" 2>&1 || ort2_rc=$?
  say "onnxruntime alone, aarch64 /proc/cpuinfo bind-mounted: exit $ort2_rc ($(tail -1 "$work/ort-cpuinfo.log"))"
  [ "$ort2_rc" != 0 ] || say "  and then: $("${smoke[@]}" 2>&1 | tail -1)"
  umount "$root/proc/cpuinfo"
fi
say "SM2 backend (auto): $(in_root /opt/xcstack/venv/bin/python -c 'from xcstack.crypto.sm import sm2_backend_info as i; b = i(); print(b["name"], b["version"], b["library"])' 2>&1 | tail -1)"
say "SM2 with the portable backend: $(in_root env XC_SM2_BACKEND=gmalglib /opt/xcstack/venv/bin/python -c '
from xcstack.crypto.sm import SM2PrivateKey, sm2_backend_info
k = SM2PrivateKey.generate(); s = k.sign(b"xcstack")
print(sm2_backend_info()["name"], "sign+verify", k.public_key.verify(b"xcstack", s), "tampered", k.public_key.verify(b"xcstack!", s))' 2>&1 | tail -1)"

# 6. serve with embedded defaults, readiness, SM2 through the API
begin "xcstack serve -> /readyz 200"
in_root env XC_DATA_DIR=/var/lib/xcstack "$xc" user bootstrap > "$work/bootstrap.txt"
in_root env XC_DATA_DIR=/var/lib/xcstack "$xc" key create arm64-test --kind sm2 | tee -a "$result"
t_serve=$(date +%s)
setsid chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 XC_DATA_DIR=/var/lib/xcstack \
  XC_SERVER__PORT="$port" XC_INFERENCE__ENABLED="$inference" "$xc" serve > "$work/serve.log" 2>&1 &
serve_pid=$!
code=000
while [ $(( $(date +%s) - t_serve )) -lt "$ready_timeout" ]; do
  kill -0 "$serve_pid" 2>/dev/null || { tail -30 "$work/serve.log"; echo "test-arm64: serve exited" >&2; exit 1; }
  code=$(curl -s -o "$work/readyz.json" -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)
  [ "$code" = 200 ] && break
  sleep 2
done
[ "$code" = 200 ] || { tail -30 "$work/serve.log"; echo "test-arm64: /readyz answered $code" >&2; exit 1; }
took "xcstack serve -> /readyz 200 (inference $inference)"
say "readyz: $(cat "$work/readyz.json")"
begin "SM2 through the API"
python3 scripts/arm64/api_check.py "http://127.0.0.1:$port" "$work/bootstrap.txt" arm64-test | tee "$work/api.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["ok"] else 1)' "$work/api.json" \
  || { echo "test-arm64: SM2 through the API failed" >&2; exit 1; }
took "SM2 sign + verify through the API"
say "api: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["algorithm"], "valid", d["valid"], "tampered_valid", d["tampered_valid"], "sign", d["sign_ms"], "ms")' "$work/api.json")"
say "test-arm64: PASSED (logs in $work)"
cd "$src"
