#!/usr/bin/env bash
# Sparse decode against what scattered pages allow, on one machine: chunkstream (random 4 and 8
# KiB chunks against the in-order read) and mempipe-cpu-kernel-bench (SmolLM2 4 x 6K bf16, budget
# 512, page_kt and head, 1 and 2 threads), alternated over ROUNDS rounds.
#   bash run.sh KB OUT [ROUNDS]   (KB: a Release mempipe-cpu-kernel-bench; logs into OUT)
set -euo pipefail
KB=$1 OUT=$2 ROUNDS=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
g++ -O2 -mavx512f -std=c++20 -o "$OUT/chunkstream" "$here/chunkstream.cc"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4"
lscpu > "$OUT/lscpu.txt"
for r in $(seq "$ROUNDS"); do
  for c in 8192 4096; do
    echo "[run] chunkstream $c round $r" >&2
    "$OUT/chunkstream" "$c" 2 > "$OUT/chunkstream_${c}_$r.log"
  done
  for th in 1 2; do
    for L in page_kt head; do
      echo "[run] kernel bench $L $th thread(s) round $r" >&2
      "$KB" $SMOL --budget=512 --dtype=bf16 --threads="$th" --kv_layout="$L" --passes=5 \
        > "$OUT/smol_bf16_${L}_t${th}_$r.log" 2>/dev/null
    done
  done
done
