#!/usr/bin/env bash
# SmolLM2 4 x 6K only, bf16 and fp32, base and new alternated.  ab_smol.sh BASE NEW OUT THREADS ROUNDS
set -euo pipefail
A=$1 B=$2 OUT=$3 T=$4 R=${5:-3}
mkdir -p "$OUT"
smol=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512
      --threads="$T" --kv_layout=head --seqs=4 --passes=15)
for r in $(seq 1 "$R"); do
  for v in base new; do
    bin=$A; [ $v = new ] && bin=$B
    "$bin" "${smol[@]}" --dtype=bf16 >"$OUT/smol4_bf16_${v}_$r.log" 2>&1
    "$bin" "${smol[@]}" --dtype=fp32 >"$OUT/smol4_fp32_${v}_$r.log" 2>&1
  done
  echo "[ab_smol] round $r done" >&2
done
