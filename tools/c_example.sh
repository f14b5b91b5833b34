#!/usr/bin/env bash
# Builds the C API (capi/, a cdylib), compiles examples/c/main.c against its
# header with the system C compiler, and runs it on a test model.
#
#   tools/c_example.sh [MODEL_DIR]     (default models/tiny-llama)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-models/tiny-llama}"
cargo build -p kvsift-c
lib="$PWD/target/debug"
out="$lib/kvsift-c-example"
"${CC:-cc}" -std=c11 -Wall -Wextra -Werror -I capi/include examples/c/main.c \
  -L "$lib" -lkvsift_c -Wl,-rpath,"$lib" -o "$out"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
"$out" "$model"
