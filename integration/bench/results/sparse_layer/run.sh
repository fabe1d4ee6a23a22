#!/usr/bin/env bash
# A sparse layer on the host in one parallel call (backend/host_sparse_layer.h: each row selected
# where its scan ends and attended there) against its three kernels apart (scan, top-k, sparse
# attention: the sum of their best passes), from one mempipe-cpu-kernel-bench binary: SmolLM2
# (4 x 6K, bf16, head layout, budget 512: one decode chunk a row, so the one-call path) at
# THREADS (default "1 2 4 8 16") on mempipe's pool and OMP (default "8 16"; empty: none) on
# libgomp's team, ROUNDS rounds (default 3). Wall clock and CPU time per thread, per layer.
#   bash integration/bench/results/sparse_layer/run.sh BENCH OUT [ROUNDS]
set -uo pipefail
BENCH=$1 OUT=$2; mkdir -p "$OUT"; T0=$SECONDS
lscpu > "$OUT/lscpu.txt"; uptime > "$OUT/uptime.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16 --budget=512 --kv_layout=head"
one() {  # name args...
  local name=$1; shift
  [ $((SECONDS - T0)) -gt "${DEADLINE:-400}" ] && { echo "skip $name (deadline)" >> "$OUT/runs.txt"; return; }
  timeout 90 "$BENCH" $SMOL "$@" --passes=7 > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> "$OUT/runs.txt"
}
for r in $(seq 1 "${3:-3}"); do
  for t in ${THREADS:-1 2 4 8 16}; do one "smol_t${t}_$r" --threads=$t; done
  for t in ${OMP-8 16}; do one "smol_t${t}omp_$r" --threads=$t --host_threads=openmp; done
  echo "round $r done at $((SECONDS - T0)) s" >> "$OUT/runs.txt"
done
# per log: wall (one call, apart), then CPU time per thread (one call, apart), ms per layer
for f in "$OUT"/*.log; do
  printf "%-16s" "$(basename "$f" .log)"
  for k in "sparse layer, one call, wall" "sparse layer apart, wall" "sparse layer, one call  " "sparse layer apart  "; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "ms") { printf " %s", $(i-1); break }}'
  done
  echo
done | tee "$OUT/summary.txt"
