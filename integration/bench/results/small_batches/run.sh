#!/usr/bin/env bash
# The runs behind README.md: the host decode kernels with 512-token chunks for every batch (BASE,
# the tree before DecodeChunkPages) and with the chunks halved for batches of few items (NEW),
# alternated in one loop on one machine.
#   run.sh BASE_BENCH NEW_BENCH OUT THREADS [ROUNDS]
# BASE_BENCH / NEW_BENCH: the two builds' mempipe-cpu-kernel-bench.
set -euo pipefail
A=${1:?base mempipe-cpu-kernel-bench} B=${2:?new mempipe-cpu-kernel-bench}
OUT=${3:?output folder} T=${4:?threads} R=${5:-3}
mkdir -p "$OUT"
smol=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512
      --threads="$T" --kv_layout=head)
for r in $(seq 1 "$R"); do
  for v in base new; do
    bin=$A; [ $v = new ] && bin=$B
    # SmolLM2 4 x 6K at budget 512: 12 (chunk, KV head) items at 512 tokens, 48 at 128.
    "$bin" "${smol[@]}" --seqs=4 --dtype=bf16 --passes=9 >"$OUT/smol4_bf16_${v}_$r.log" 2>&1
    # One sequence: 3 items sparse (12 new), dense 36 (72 new).
    "$bin" "${smol[@]}" --seqs=1 --dtype=bf16 --passes=9 >"$OUT/smol1_bf16_${v}_$r.log" 2>&1
    "$bin" "${smol[@]}" --seqs=4 --dtype=fp32 --passes=9 >"$OUT/smol4_fp32_${v}_$r.log" 2>&1
    # Llama-3-8B layer 1 x 32K, budget 4096 at page 16: 64 items sparse either way (a control).
    "$bin" --threads="$T" --kv_layout=head --passes=5 --layers=4 >"$OUT/llama1_bf16_${v}_$r.log" 2>&1
    echo "[run] round $r $v done" >&2
  done
done
