#!/usr/bin/env bash
# Sparse decode on the build VM against what its access pattern allows: chunkread (random 4 KiB
# chunks against in-order, 1 and 2 threads), then the kernel bench's SmolLM2 4 x 6K layers at
# budgets 512 and 2048 with the committed kernel (kb) and its prefetch variants (kb_<name>:
# a2, a3 = the next page's rows taken 2 or 3 pages ahead; t0 = into L1; nopf = no prefetch),
# alternated over ROUNDS.
#   run.sh DIR_WITH_chunkread_kb_AND_VARIANTS OUT ROUNDS
set -uo pipefail
B=$1; O=$2; R=${3:-3}
mkdir -p "$O"
for t in 1 2; do "$B/chunkread" 4096 "$t" 3 > "$O/chunkread_${t}t.log" 2>&1; done
S=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --kv_layout=head --threads=2 --passes=7)
for r in $(seq 1 "$R"); do
  for v in kb kb_a2 kb_a3 kb_t0 kb_nopf; do
    [ -x "$B/$v" ] || continue
    "$B/$v" "${S[@]}" --dtype=bf16 --budget=512 2>&1 | grep -v '^\[' > "$O/smol_bf16-512_${v}_$r.log"
  done
  "$B/kb" "${S[@]}" --dtype=fp32 --budget=512 2>&1 | grep -v '^\[' > "$O/smol_fp32-512_kb_$r.log"
  "$B/kb" "${S[@]}" --dtype=bf16 --budget=2048 2>&1 | grep -v '^\[' > "$O/smol_bf16-2048_kb_$r.log"
  echo "round $r done $(date -u +%H:%M:%S)"
done
