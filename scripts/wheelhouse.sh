#!/usr/bin/env bash
# Offline wheelhouse for an air-gapped host:  scripts/wheelhouse.sh PLATFORM [OUT_DIR]
#   (make wheelhouse PLATFORM=aarch64)
# PLATFORM: x86_64 | aarch64 | loongarch64 (also amd64, arm64, loong64, linux/amd64, linux/arm64)
# OUT_DIR:  default wheelhouse/<platform>
# Env:      PYTHON_VERSION (3.11), EXTRAS (postgres,redis,kingbase,pkcs11,sbom), PIP (.venv/bin/pip or pip3),
#           DRY_RUN=1 (print the pip commands only), RESOLVE_ONLY=1 (print what pip would pick, fetch nothing),
#           SDIST_ONLY="pkg ..." (fetch these as sdists even where wheels exist, to build them tuned).
#
# Requirements are read from xcstack's own wheel and their markers evaluated for the TARGET (linux/<arch>,
# the Python version, the extras asked for), not for this machine.
# x86_64 / aarch64: binary wheels for manylinux_2_28 + manylinux_2_17 + manylinux2014 passed together
#   (measured: with one tag pip falls back to years-old releases of packages that dropped the others).
# A direct requirement without a wheel for the target is fetched as an sdist (measured for aarch64:
#   gmssl-pyx, which bundles GmSSL's C sources, and PyKCS11); build those on the target (see below).
# loongarch64: PyPI has (almost) no loongarch64 wheels. The set is resolved with x86_64 wheels (the
#   loongarch64 markers already dropped orjson, uvloop, onnxruntime and milvus-lite: xcstack runs on stdlib
#   json and the asyncio loop there; inference needs a local ONNX Runtime build, see docs/deployment.md);
#   pure-Python wheels are kept and every package with native code is fetched as an sdist.
# On the target:
#   . <(python3 -m xcstack.supply.buildenv --target kunpeng)      # or PYTHONPATH=src/ from a checkout
#   pip wheel --no-index --find-links OUT_DIR -w OUT_DIR OUT_DIR/*.tar.gz   # only if sdists are present
#   pip install --no-index --find-links OUT_DIR 'xcstack[EXTRAS]'
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "${1#linux/}" in
  x86_64|amd64) arch=x86_64 ;;
  aarch64|arm64) arch=aarch64 ;;
  loongarch64|loong64) arch=loongarch64 ;;
  *) echo "wheelhouse: unknown platform '$1'" >&2; usage ;;
esac
out=${2:-wheelhouse/$arch}
pyver=${PYTHON_VERSION:-3.11}
cpver=cp${pyver/./}
extras=${EXTRAS:-postgres,redis,kingbase,pkcs11,sbom}
if [ -z "${PIP:-}" ]; then
  if [ -x .venv/bin/pip ]; then PIP=.venv/bin/pip; else PIP=pip3; fi
fi
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
SDIST_ONLY=${SDIST_ONLY:-}

run() {
  if [ "${DRY_RUN:-}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
[ "${RESOLVE_ONLY:-}" = 1 ] || mkdir -p "$out"

# 1. xcstack itself, as a wheel (pure Python)
run "$PIP" wheel --no-deps --quiet -w "$build" .
if [ "${DRY_RUN:-}" = 1 ]; then
  whl="$build/xcstack-0-py3-none-any.whl"
else
  whl=$(ls "$build"/xcstack-*.whl)
fi

# 2. its requirements for the target, split into binary wheels (reqs.txt) and sdists (sdist.txt)
if [ "${DRY_RUN:-}" = 1 ]; then
  echo "# requirements of xcstack for linux/$arch, extras $extras -> reqs.txt (wheels) + sdist.txt ($SDIST_ONLY)"
  : > "$build/reqs.txt"
  : > "$build/sdist.txt"
else
  "$py" - "$whl" "$arch" "$pyver" "$extras" "$SDIST_ONLY" "$build" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

whl, arch, pyver, extras, sdist_only, out = sys.argv[1:7]
with zipfile.ZipFile(whl) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")]
env = {"platform_machine": arch, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
       "python_version": pyver, "python_full_version": pyver + ".0", "implementation_name": "cpython",
       "platform_python_implementation": "CPython"}
wanted, todo = {""}, [e for e in extras.split(",") if e]
while todo:  # an extra that names xcstack[...] again (all = xcstack[postgres,...]) expands here
    e = todo.pop()
    if e in wanted:
        continue
    wanted.add(e)
    for r in reqs:
        if canonicalize_name(r.name) == "xcstack" and r.marker and r.marker.evaluate({**env, "extra": e}):
            todo.extend(r.extras)
skip = {canonicalize_name(n) for n in sdist_only.split() if n}
binary, source = set(), set()
for r in reqs:
    if canonicalize_name(r.name) == "xcstack":
        continue
    if any((r.marker.evaluate({**env, "extra": e}) if r.marker else e == "") for e in wanted):
        r.marker = None
        (source if canonicalize_name(r.name) in skip else binary).add(str(r))
with open(f"{out}/reqs.txt", "w") as fh:
    fh.write("".join(f"{r}\n" for r in sorted(binary)))
with open(f"{out}/sdist.txt", "w") as fh:
    fh.write("".join(f"{r}\n" for r in sorted(source)))
print(f"wheelhouse: linux/{arch}: {len(binary)} requirements as wheels, {len(source)} as sdists", file=sys.stderr)
PYEOF
fi

tag_arch=$arch
[ "$arch" = loongarch64 ] && tag_arch=x86_64
common=(--only-binary=:all:
        --platform "manylinux_2_28_$tag_arch" --platform "manylinux_2_17_$tag_arch" --platform "manylinux2014_$tag_arch"
        --python-version "$pyver" --implementation cp --abi "$cpver" --abi abi3 --abi none)

# 3. a direct requirement with no wheel for the target moves to the sdists (asked per package, metadata only)
if [ "${DRY_RUN:-}" != 1 ] && [ "$arch" != loongarch64 ]; then
  : > "$build/reqs.ok"
  while IFS= read -r req; do
    [ -n "$req" ] || continue
    if "$PIP" install --dry-run --ignore-installed --no-deps --quiet --target "$build/probe" "${common[@]}" \
         "$req" >/dev/null 2>&1; then
      echo "$req" >> "$build/reqs.ok"
    else
      echo "wheelhouse: no linux/$arch wheel of $req: fetched as an sdist" >&2
      echo "$req" >> "$build/sdist.txt"
    fi
  done < "$build/reqs.txt"
  mv "$build/reqs.ok" "$build/reqs.txt"
fi

if [ "${RESOLVE_ONLY:-}" = 1 ]; then
  run "$PIP" install --dry-run --ignore-installed --quiet --report "$build/report.json" --target "$build/t" \
    "${common[@]}" -r "$build/reqs.txt"
  if [ "${DRY_RUN:-}" != 1 ]; then
    "$py" - "$build/report.json" "$build/sdist.txt" <<'PYEOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    m = item["metadata"]
    print(f'{m["name"]}=={m["version"]}  {item["download_info"]["url"].rsplit("/", 1)[-1]}')
for line in open(sys.argv[2]).read().split("\n"):
    if line:
        print(f"{line}  (sdist: build it on the target with the vendor flags)")
PYEOF
  fi
  exit 0
fi

run cp "$whl" "$out/"
# sdists are fetched with `--no-binary <that package>` only, so pip may prepare their metadata with
# binary build tools (setuptools, swig, ...); `--no-binary :all:` would try to build those from source too.
fetch_sdist() {  # name==version or a requirement
  local pkg=${1%%[=<>!~ ;]*}
  "$PIP" download --quiet --no-deps --no-binary "$pkg" -d "$out" "$1" \
    || echo "wheelhouse: WARNING: no sdist of $1 on the index" >&2
}
if [ "$arch" != loongarch64 ]; then
  run "$PIP" download --quiet -d "$out" "${common[@]}" -r "$build/reqs.txt"
  if [ "${DRY_RUN:-}" != 1 ]; then
    while IFS= read -r req; do
      if [ -n "$req" ]; then fetch_sdist "$req"; fi
    done < "$build/sdist.txt"
  fi
else
  run "$PIP" download --quiet -d "$build/x86" "${common[@]}" -r "$build/reqs.txt"
  if [ "${DRY_RUN:-}" != 1 ]; then
    for w in "$build"/x86/*.whl; do
      base=$(basename "$w")
      name=${base%%-*}
      rest=${base#*-}
      version=${rest%%-*}
      case "$base" in
        *-none-any.whl) cp "$w" "$out/" ;;
        *) fetch_sdist "$name==$version" ;;
      esac
    done
  fi
fi

# 4. what the sdists need to build offline: their [build-system] requires (setuptools and wheel when they
#    declare none), as wheels for the target (loongarch64: pure-Python ones only; native build tools such
#    as maturin or cmake must come from the target's distribution there).
if [ "${DRY_RUN:-}" != 1 ] && compgen -G "$out/*.tar.gz" > /dev/null; then
  "$py" - "$out" > "$build/buildreqs.txt" <<'PYEOF'
import glob, sys, tarfile, tomllib
reqs = {"setuptools>=68", "wheel"}
for path in glob.glob(f"{sys.argv[1]}/*.tar.gz"):
    try:
        with tarfile.open(path) as tf:
            member = next((m for m in tf.getmembers() if m.name.count("/") == 1
                           and m.name.endswith("/pyproject.toml")), None)
            if member is None:
                continue
            data = tomllib.load(tf.extractfile(member))
    except (OSError, tarfile.TarError, tomllib.TOMLDecodeError):
        continue
    reqs.update(data.get("build-system", {}).get("requires", []))
print("\n".join(sorted(reqs)))
PYEOF
  if [ "$arch" = loongarch64 ]; then
    "$PIP" download --quiet -d "$out" --only-binary=:all: --platform any --python-version "$pyver" \
      --implementation py --abi none -r "$build/buildreqs.txt" \
      || echo "wheelhouse: WARNING: some build requirements have no pure-Python wheel:" \
              "$(tr '\n' ' ' < "$build/buildreqs.txt")" >&2
  else
    "$PIP" download --quiet -d "$out" "${common[@]}" -r "$build/buildreqs.txt" \
      || echo "wheelhouse: WARNING: could not fetch every build requirement:" \
              "$(tr '\n' ' ' < "$build/buildreqs.txt")" >&2
  fi
fi
[ "${DRY_RUN:-}" = 1 ] || echo "wheelhouse: $(find "$out" -maxdepth 1 -type f | wc -l) files in $out"
