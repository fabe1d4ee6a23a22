#!/usr/bin/env bash
# mempipe-cpu-kernel-bench with the caches in 2 MiB pages (--huge_pages=true) and in 4 KiB pages
# (false), 1 and 2 threads, SmolLM2 4 x 6K bf16 at budget 512, head-major cache, 2 rounds.
#   kernel_bench_ab.sh PATH/TO/mempipe-cpu-kernel-bench > kernel_bench_ab.log
set -uo pipefail
KB=$1
S=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4
   --kv_layout=head --passes=7 --dtype=bf16 --budget=512)
for r in 1 2; do
  for t in 1 2; do
    for h in true false; do
      echo "== t=$t huge=$h"
      "$KB" "${S[@]}" --threads="$t" --huge_pages="$h" 2>&1 |
        grep -E "^  (sparse attention|dense attention) *[0-9]|reads: median|, wall  " | head -8
    done
  done
done
