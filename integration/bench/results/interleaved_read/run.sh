#!/usr/bin/env bash
# The host kernels against the STREAM-like read taken just before and after them (cpu-kernel-bench
# since 9fc2b66), and the scattered-chunk read (mempipe-membw --chunk_kib, since 3d79ddf).
#   run.sh BIN_DIR OUT_DIR THREADS
# BIN_DIR holds mempipe-cpu-kernel-bench and mempipe-membw (a Release build's
# build/integration/bench); logs go to OUT_DIR, three repetitions per shape.
set -euo pipefail
bin=$1 out=$2 t=$3
mkdir -p "$out"
lscpu > "$out/lscpu.txt"
smol="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --budget=512 --seqs=4 --kv_layout=head"
for r in 1 2 3; do
  "$bin/mempipe-cpu-kernel-bench" $smol --context=6144 --dtype=bf16 --threads=$t --passes=15 > "$out/smol_bf16_6k_$r.log" 2>/dev/null
  "$bin/mempipe-cpu-kernel-bench" $smol --context=6144 --dtype=fp32 --threads=$t --passes=15 > "$out/smol_fp32_6k_$r.log" 2>/dev/null
  "$bin/mempipe-cpu-kernel-bench" $smol --context=8192 --dtype=bf16 --threads=$t --passes=15 > "$out/smol_bf16_8k_$r.log" 2>/dev/null
  "$bin/mempipe-cpu-kernel-bench" --kv_layout=head --threads=$t --passes=15 > "$out/llama_bf16_32k_$r.log" 2>/dev/null
done
"$bin/mempipe-membw" --threads=1,$t --chunk_kib=4,8,16,32,64 --passes=21 > "$out/chunks.log" 2>/dev/null
