#!/usr/bin/env bash
# sections.py for both backends, alternated: glibc's malloc and tcmalloc at fp32 4 x 2048 (two
# rounds each), then tcmalloc at fp32 4 x 4096.   bash .../sections.sh OUT   (~15 min on the VM)
set -euo pipefail
OUT=${1:?usage: sections.sh OUT}; mkdir -p "$OUT"
S=integration/bench/results/prefill_malloc/sections.py
TC=$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')
[ -n "$TC" ] || { echo "no libtcmalloc_minimal.so.4 (apt-get install libtcmalloc-minimal4)"; exit 1; }
for r in 1 2; do
  for b in CUSTOM CPU_ATTN; do python "$S" $b 2048 > "$OUT/glibc_${b}_2048_$r.log" 2>&1; done
  for b in CPU_ATTN CUSTOM; do LD_PRELOAD=$TC python "$S" $b 2048 > "$OUT/tc_${b}_2048_$r.log" 2>&1; done
done
for b in CUSTOM CPU_ATTN; do LD_PRELOAD=$TC python "$S" $b 4096 > "$OUT/tc_${b}_4096_1.log" 2>&1; done
