#!/usr/bin/env bash
# Sparse and dense decode with pages of 32 and 64 tokens (SmolLM2 4 x 6K bf16, budget 512),
# head-major and page_kt caches, 1 and 2 threads, alternated over ROUNDS rounds.
#   bash run.sh KB OUT [ROUNDS]   (KB: a Release mempipe-cpu-kernel-bench; logs into OUT)
set -euo pipefail
KB=$1 OUT=$2 ROUNDS=${3:-2}
mkdir -p "$OUT"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --context=6144 --seqs=4 --budget=512"
lscpu > "$OUT/lscpu.txt"
for r in $(seq "$ROUNDS"); do
  for th in 1 2; do
    for P in 32 64; do
      for L in page_kt head; do
        echo "[run] round $r, $th thread(s), page $P, $L" >&2
        "$KB" $SMOL --page_size="$P" --dtype=bf16 --threads="$th" --kv_layout="$L" \
          --passes=5 > "$OUT/smol_bf16_p${P}_${L}_t${th}_$r.log" 2>/dev/null
      done
    done
  done
done
