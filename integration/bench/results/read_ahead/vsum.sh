#!/usr/bin/env bash
# One line per vllm_cpu_profile.py log: ms per decode step of the step, mempipe's forward,
# sparse and dense decode, and the append.   bash vsum.sh vllm_logs
for f in "$1"/prof_*.txt; do
  printf "%-28s %s\n" "$(basename "$f" .txt)" "$(grep -E '^\s+(step|forward|sparse_decode|dense_decode|append_kv_and_digests)\s' "$f" \
    | awk '{printf "%s %s | ", $1, $2}')"
done
