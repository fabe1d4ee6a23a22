#!/usr/bin/env bash
# Top-k by a counting threshold search, and the scan and top-k in one parallel call
# (retriever/select.cc, ComputeRelevancyThen), against the head before them: the kernel bench's
# scan, top-k and (new binary only) "scan + top-k, one call" rows, wall clock per layer, for
# SmolLM2 (4 x 6K, head) and Llama-3-8B (1 x 32K, page_kt), bf16, at 1, 2 and 16 threads, on
# mempipe's pool and (16 threads) on libgomp's team; binaries alternated in each round.
#   bash integration/bench/results/fused_select/run.sh OLD NEW OUT [ROUNDS]
# OLD, NEW: mempipe-cpu-kernel-bench (Release, -DMEMPIPE_GPU=off -DMEMPIPE_XRT=off) built at
# 7c5d904 and after. DEADLINE (seconds, default 400) skips what would start past it; THREADS
# (default "1 2 16") are the pool's thread counts, OMP (default 16; empty: none) libgomp's.
set -uo pipefail
OLD=$1 NEW=$2 OUT=$3; mkdir -p "$OUT"; T0=$SECONDS
lscpu > "$OUT/lscpu.txt"; uptime > "$OUT/uptime.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16 --budget=512 --kv_layout=head"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1 --dtype=bf16 --kv_layout=page_kt"
one() {  # name binary args...
  local name=$1 bin=$2; shift 2
  [ $((SECONDS - T0)) -gt "${DEADLINE:-400}" ] && { echo "skip $name (deadline)" >> "$OUT/runs.txt"; return; }
  timeout 90 "$bin" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> "$OUT/runs.txt"
}
for r in $(seq 1 "${4:-2}"); do
  for arm in old:"$OLD" new:"$NEW"; do
    name=${arm%%:*} bin=${arm#*:}
    for t in ${THREADS:-1 2 16}; do
      one "smol_${name}_t${t}_$r" "$bin" $SMOL --threads=$t --passes=5
      one "llama_${name}_t${t}_$r" "$bin" $LLAMA --threads=$t --passes=3 --layers=4
    done
    for t in ${OMP-16}; do
      one "smol_${name}_t${t}omp_$r" "$bin" $SMOL --threads=$t --passes=5 --host_threads=openmp
      one "llama_${name}_t${t}omp_$r" "$bin" $LLAMA --threads=$t --passes=3 --layers=4 --host_threads=openmp
    done
  done
  echo "round $r done at $((SECONDS - T0)) s" >> "$OUT/runs.txt"
done
# scan, top-k, both in one call, sparse attention: wall clock per layer and % of the read
for f in "$OUT"/*.log; do
  printf "%-20s" "$(basename "$f" .log)"
  for k in "relevancy scan (digests), wall" "top-k (SelectPages), wall" "scan + top-k, one call, wall" "sparse attention, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) { if ($i == "ms") printf " %s ms", $(i-1); if ($i ~ /%$/) printf " %s", $i }}'
  done
  echo
done | tee "$OUT/summary.txt"
