#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against the venv's torch, with Gloo and no MPI,
# and cache the wheel so later runs (same machine, fresh clone included) take seconds.
#
# Published 0.28.1 does not build against torch >= 2.1 as is; this script fixes it in the
# unpacked sdist only (never in installed files):
#   1. CMake 4 rejects the old cmake_minimum_required of its third-party code:
#      CMAKE_POLICY_VERSION_MINIMUM=3.5 is exported.
#   2. It compiles as C++14 while PyTorch headers need C++17: CMAKE_CXX_STANDARD 14 -> 17
#      in CMakeLists.txt and horovod/torch/CMakeLists.txt.
#
# Usage: scripts/build_horovod.sh [python]   (default: .venv/bin/python)
# Cache:  $GRADZIP_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/gradzip (survives fresh
#         clones on the same machine); the repo's git-ignored .cache/horovod is also searched,
#         and used when the user cache is not writable.
set -euo pipefail

HVD_VERSION=0.28.1
# Horovod's runtime/build requirements, pinned.
BUILD_DEPS=(cloudpickle==3.1.3 psutil==7.2.2 PyYAML==6.0.4 packaging==26.4 cffi==2.1.1)

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-${PY:-$ROOT/.venv/bin/python}}"
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
[ -x "$PY" ] || { echo "build_horovod: no python at $PY (run 'make install' first)" >&2; exit 1; }

log() { echo "build_horovod: $*" >&2; }

# The wheel is only valid for this python and this torch build (C++ ABI): key the cache on
# both. Read from package metadata: importing torch would cost seconds on every `make test`.
KEY="$("$PY" -c 'import sys, importlib.metadata as m
print("cp%d%d-torch%s" % (*sys.version_info[:2], m.version("torch")))')"
# Written into the venv once horovod.torch is known to import there for this KEY.
STAMP="$(dirname "$PY")/../.gradzip-horovod"
installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("horovod"))' 2>/dev/null || true)"
if [ "$installed" = "$HVD_VERSION" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$KEY" ]; then
    log "horovod $HVD_VERSION already installed for $KEY"
    exit 0
fi
if [ "$installed" = "$HVD_VERSION" ] && "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
    echo "$KEY" > "$STAMP"
    log "horovod $HVD_VERSION already installed"
    exit 0
fi
USER_CACHE="${GRADZIP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gradzip}/horovod-$HVD_VERSION-$KEY"
REPO_CACHE="$ROOT/.cache/horovod/horovod-$HVD_VERSION-$KEY"

install_wheel() {  # $1: wheel file
    log "installing $1"
    "$PY" -m pip install -q "${BUILD_DEPS[@]}"
    "$PY" -m pip install -q --no-deps --force-reinstall "$1"
    "$PY" -c "import horovod.torch" || { log "installed wheel $1 does not import"; return 1; }
    echo "$KEY" > "$STAMP"
}

for dir in "$USER_CACHE" "$REPO_CACHE"; do
    whl="$(ls "$dir"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -n "$whl" ]; then
        install_wheel "$whl" && exit 0
        log "cached wheel $whl is broken; rebuilding"
        rm -f "$whl"
    fi
done

command -v cmake >/dev/null || {
    log "cmake missing; installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq cmake
}
command -v g++ >/dev/null || { log "a C++ compiler (g++) is required"; exit 1; }

OUT="$USER_CACHE"
mkdir -p "$OUT" 2>/dev/null || OUT="$REPO_CACHE"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "building horovod $HVD_VERSION for $KEY (takes ~10 minutes on 2 cores) in $WORK"
"$PY" -m pip install -q "${BUILD_DEPS[@]}"
# The sdist is kept one level up: a rebuild for another python or torch needs no download.
SDIST="$(dirname "$OUT")/horovod-$HVD_VERSION.tar.gz"
[ -f "$SDIST" ] || "$PY" -m pip download -q --no-deps --no-binary :all: \
    -d "$(dirname "$OUT")" "horovod==$HVD_VERSION"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/horovod-$HVD_VERSION"

for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { log "no C++14 line in $f: sdist changed?"; exit 1; }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
done

export CMAKE_POLICY_VERSION_MINIMUM=3.5
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
    MAKEFLAGS="${MAKEFLAGS_HOROVOD:--j2}" \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"

whl="$(ls "$WORK"/dist/horovod-"$HVD_VERSION"-*.whl | head -n 1)"
cp "$whl" "$OUT/"
install_wheel "$OUT/$(basename "$whl")"
log "done: $OUT/$(basename "$whl")"
