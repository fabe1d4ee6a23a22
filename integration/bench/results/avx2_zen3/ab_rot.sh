#!/usr/bin/env bash
# The host decode kernels of several builds of mempipe-cpu-kernel-bench, the builds' order rotated
# from one round to the next (so no build always runs first): SmolLM2 4 x 6K (bf16, fp32) and
# Llama-3-8B 1 x 32K (bf16), 2 threads, head-major cache.
#   ab_rot.sh OUT ROUNDS NAME=BENCH [NAME=BENCH ...]
set -euo pipefail
OUT=${1:?output folder} R=${2:?rounds}; shift 2
names=() bins=()
for a in "$@"; do names+=("${a%%=*}"); bins+=("${a#*=}"); done
mkdir -p "$OUT"
smol=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512
      --threads=2 --kv_layout=head --seqs=4 --passes=15)
n=${#names[@]}
for r in $(seq 1 "$R"); do
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r) % n ))
    b=${bins[$i]} v=${names[$i]}
    "$b" "${smol[@]}" --dtype=bf16 >"$OUT/smol4_bf16_${v}_$r.log" 2>&1
    "$b" "${smol[@]}" --dtype=fp32 >"$OUT/smol4_fp32_${v}_$r.log" 2>&1
    "$b" --threads=2 --kv_layout=head --passes=5 --layers=4 >"$OUT/llama1_bf16_${v}_$r.log" 2>&1
  done
  echo "[ab_rot] round $r of $R done" >&2
done
