#!/usr/bin/env bash
# The relevancy scan before and after 2026-12-05's change (retriever/relevancy.cc: digest rows
# prefetched into L2, widened in registers once per 4 query heads): mempipe-cpu-kernel-bench's
# rows for SmolLM2 (4 x 6K, head) and Llama-3-8B (1 x 32K, page_kt), bf16, 1 and 2 threads, two
# rounds with the binaries alternated.
#   bash integration/bench/results/scan_l2/run.sh OLD NEW OUT
# OLD, NEW: the bench (Release, -DMEMPIPE_GPU=off -DMEMPIPE_XRT=off) built at f2546b3 and after.
set -euo pipefail
OLD=$1 NEW=$2 OUT=$3; mkdir -p "$OUT"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16 --budget=512 --kv_layout=head"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1 --dtype=bf16 --kv_layout=page_kt"
for r in 1 2; do
  for arm in kb2:"$OLD" kb4:"$NEW"; do
    name=${arm%%:*} bin=${arm#*:}
    for t in 1 2; do
      echo "round $r $name $t thread(s)" >&2
      "$bin" $SMOL --threads=$t --passes=5 > "$OUT/smol_${name}_t${t}_$r.log" 2>&1
      "$bin" $LLAMA --threads=$t --passes=3 --layers=4 > "$OUT/llama_${name}_t${t}_$r.log" 2>&1
    done
  done
done
# scan, top-k and sparse attention: wall clock per layer, % of the read
for f in "$OUT"/*.log; do
  printf "%-18s" "$(basename "$f" .log)"
  for k in "relevancy scan (digests), wall" "top-k (SelectPages), wall" "sparse attention, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) { if ($i == "ms") printf " %s ms", $(i-1); if ($i ~ /%$/) printf " %s", $i }}'
  done
  echo
done
