#!/usr/bin/env bash
set -uo pipefail
KB=$1; O=$2; R=$3; T=$4
mkdir -p "$O"
S=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --passes=7 --budget=512 --dtype=bf16)
for r in $(seq 1 "$R"); do
  for k in head 0 2 3 4; do
    if [ $k = head ]; then L=head; K=0; else L=head_kt; K=$k; fi
    MP_PF=$K "$KB" "${S[@]}" --threads="$T" --kv_layout="$L" > "$O/t${T}_${k}_$r.log" 2>&1
    echo "== bf16 t=$T $k round $r"; grep -E "^  (sparse attention)(, wall| from cache, wall|'s reads, wall) " "$O/t${T}_${k}_$r.log"
  done
done
