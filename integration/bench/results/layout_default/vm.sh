#!/usr/bin/env bash
# The host KV layouts under the kernels that read them: SmolLM2 (4 x 6K, budget 512, page 32)
# in bf16 and fp32, head / page / page_kt, at 1 and 2 threads on the AVX-512 kernels, and at 1
# thread on the avx2 and portable kernels, ROUNDS rounds with the layouts alternated.
#   bash vm.sh BENCH OUT [ROUNDS]      (BENCH: mempipe-cpu-kernel-bench, a Release build)
set -uo pipefail
BENCH=$1 OUT=$2; mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt"; uptime > "$OUT/uptime.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --budget=512 --passes=5"
for r in $(seq 1 "${3:-2}"); do
  for dt in bf16 fp32; do
    for t in 1 2; do
      for L in head page page_kt; do
        "$BENCH" $SMOL --dtype=$dt --kv_layout=$L --threads=$t > "$OUT/${dt}_${L}_t${t}_$r.log" 2>/dev/null
      done
    done
    for k in avx2 portable; do
      for L in head page_kt; do
        "$BENCH" $SMOL --dtype=$dt --kv_layout=$L --threads=1 --cpu_kernel=$k \
          > "$OUT/${dt}_${L}_${k}_$r.log" 2>/dev/null
      done
    done
  done
  echo "round $r done $(date -u +%H:%M:%S)"
done
# Per log, wall ms per layer (and % of the read around it): sparse attention, its bare reads,
# the one-call sparse layer, dense attention.
for f in "$OUT"/*.log; do
  printf "%-24s" "$(basename "$f" .log)"
  for k in "sparse attention, wall" "sparse attention's reads, wall" "sparse layer, one call, wall" "dense attention, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "ms") { p = $(i+5); if (p !~ /%/) p = "-"; printf " %s (%s)", $(i-1), p; break }}'
  done
  echo
done | tee "$OUT/summary.txt"
