#!/usr/bin/env bash
# Runs every benchmark kvsift has on the machine it is started on, from
# prebuilt release binaries, and writes the outputs to $OUT (default
# ./bench-out). Used for the real-GPU figures in docs/BENCHMARKS.md:
#
#   cargo build --release && cargo bench --no-run
#   mkdir -p .bin && cp target/release/kvsift .bin/ \
#     && cp "$(ls -t target/release/deps/kernels-* | grep -v '\.d$' | head -1)" .bin/kernels
#   tools/bench_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
.bin/kvsift info 2>&1 | tee "$OUT/info.txt"
.bin/kernels --bench --noplot 2>&1 | grep -v '^Benchmarking' | tee "$OUT/kernels.txt"
