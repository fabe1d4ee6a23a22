#!/usr/bin/env bash
# The host decode kernels from DRAM and from cache, and their arithmetic beside the cores' FMA
# rate (mempipe-cpu-kernel-bench since a061458), SmolLM2-135M as the vLLM bench serves it.
#   run.sh BIN_DIR OUT_DIR THREADS
# BIN_DIR holds mempipe-cpu-kernel-bench (a Release build's build/integration/bench); logs go to
# OUT_DIR, three repetitions per dtype.
set -euo pipefail
bin=$1 out=$2 t=$3
mkdir -p "$out"
lscpu > "$out/lscpu.txt"
smol="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --budget=512 --seqs=4 --kv_layout=head --context=6144"
for r in 1 2 3; do
  for dt in bf16 fp32; do
    echo "[run] $r/3 $dt" >&2
    "$bin/mempipe-cpu-kernel-bench" $smol --dtype=$dt --threads=$t --passes=15 > "$out/smol_${dt}_6k_$r.log" 2>/dev/null
  done
done
