#!/usr/bin/env bash
# Runs kvsift's benchmarks on the machine it is started on, from prebuilt
# release binaries in .bin/, and writes the outputs to $OUT (default
# ./bench-out). Used for the real-GPU figures in docs/BENCHMARKS.md.
#
#   cargo build --release && cargo bench --no-run
#   mkdir -p .bin && cp target/release/kvsift .bin/ \
#     && cp "$(ls -t target/release/deps/kernels-* | grep -v '\.d$' | head -1)" .bin/kernels \
#     && cp "$(ls -t target/release/deps/compression-* | grep -v '\.d$' | head -1)" .bin/compression
#   tools/bench_device.sh [kernels] [models] [batch] [bench] [quant]     # default: all
#
# `models` needs python3 with torch + transformers to write the random
# ~100M-parameter Llama (tools/make_bench_model.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
what="${*:-kernels models batch bench quant}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
.bin/kvsift info 2>&1 | tee "$OUT/info.txt"

if [[ " $what " == *" kernels "* ]]; then
  .bin/kernels --bench --noplot 2>&1 | grep -v '^Benchmarking' | tee "$OUT/kernels.txt"
fi

if [[ " $what " == *" models "* ]]; then
  prompt="$(python3 -c "print(' '.join(['The cache keeps every key and value the model has seen.'] * 12))")"
  python3 tools/make_bench_model.py /tmp/llama-100m 2>&1 | tail -1
  {
    for m in models/tiny-llama models/tiny-qwen2 models/tiny-qwen3 models/tiny-mistral /tmp/llama-100m; do
      for dt in f16 f32; do
        .bin/kvsift generate --model "$m" --weights-dtype "$dt" --prompt "$prompt" --max-tokens 128 --json \
          | python3 -c "import json,sys; j=json.load(sys.stdin); print('$m $dt prompt %d gen %d prefill %.1f tok/s decode %.1f tok/s' % (j['prompt_tokens'], len(j['tokens']), j['prefill_tok_s'], j['decode_tok_s']))"
      done
    done
  } 2>&1 | tee "$OUT/models.txt"
fi

if [[ " $what " == *" batch "* ]]; then
  [ -d /tmp/llama-100m ] || python3 tools/make_bench_model.py /tmp/llama-100m 2>&1 | tail -1
  {
    for m in models/tiny-llama /tmp/llama-100m; do
      for b in 1 4 16; do
        .bin/kvsift generate --model "$m" --prompt "The cache keeps every key and value the model has seen." \
          --batch "$b" --max-tokens 128 --temperature 0.8 --json \
          | python3 -c "
import json, statistics, sys
j = json.load(sys.stdin); r = j['requests']; kv = j['kv']
print('$m batch $b: %d tokens in %.2f s = %.1f tok/s aggregate; per-request decode %.1f tok/s; peak KV pages %d of %d (%d B each)' % (
    j['generated_tokens'], j['seconds'], j['throughput_tok_s'], statistics.mean(x['decode_tok_s'] for x in r),
    kv['peak_pages_in_use'], kv['pool']['pages_total'], kv['pool']['page_bytes']))"
      done
    done
  } 2>&1 | tee "$OUT/batch.txt"
fi

# llama-bench-style figures, the copy roofline, a decode profile, the
# compression pass against a decode step, and the fixed-memory throughput
# experiment. Needs .bin/compression (the compression bench binary).
if [[ " $what " == *" bench "* ]]; then
  [ -d /tmp/llama-100m ] || python3 tools/make_bench_model.py /tmp/llama-100m 2>&1 | tail -1
  {
    .bin/kvsift bench roofline
    for b in 1 4 16; do
      .bin/kvsift bench --model /tmp/llama-100m -p 512 -n 128 -r 3 --batch "$b" --profile
    done
    # Chained decode: 8 and 32 steps per submission (tokens fed back on the GPU).
    for c in 8 32; do
      for b in 1 16; do
        .bin/kvsift bench --model /tmp/llama-100m -p 0 -n 128 -r 3 --batch "$b" --steps-per-submit "$c"
      done
    done
    .bin/kvsift bench throughput --model /tmp/llama-100m --kv-pool-mb 64 --prompt-len 128 \
      --gen-len 1024 --kv rkv --budget 128 --max-sequences 512
    # Soak: R-KV's cache stays flat over a long generation, one sequence and 16.
    .bin/kvsift bench soak --tokens 20000 --kv rkv --budget 32 --buffer 16
    .bin/kvsift bench soak --tokens 5000 --batch 16 --kv rkv --budget 32 --buffer 16
    [ -x .bin/compression ] && .bin/compression --profile
  } 2>&1 | tee "$OUT/bench.txt"
fi

# Weight formats: decode and prefill of the ~100M Llama in f16, q8_0, q4_0
# (the output projection f16, then quantized too), two alternating rounds;
# `kvsift bench` prints the weight bytes a decode token reads and the
# fraction of the copy roofline they reach.
if [[ " $what " == *" quant "* ]]; then
  [ -d /tmp/llama-100m ] || python3 tools/make_bench_model.py /tmp/llama-100m 2>&1 | tail -1
  {
    .bin/kvsift bench roofline
    for round in 1 2; do
      for dt in f16 q8_0 q4_0 "q8_0 --quantize-lm-head" "q4_0 --quantize-lm-head"; do
        echo "== round $round: --weights-dtype $dt"
        # shellcheck disable=SC2086
        .bin/kvsift bench --model /tmp/llama-100m -p 512 -n 128 -r 3 --weights-dtype $dt
        # shellcheck disable=SC2086
        .bin/kvsift bench --model /tmp/llama-100m -p 0 -n 128 -r 3 --batch 16 --weights-dtype $dt
      done
    done
  } 2>&1 | tee "$OUT/quant.txt"
fi
