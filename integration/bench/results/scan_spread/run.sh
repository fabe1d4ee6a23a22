#!/usr/bin/env bash
# The relevancy scan before and after its prefetches were spread over its arithmetic (README.md),
# arms alternated in every round: mempipe-cpu-kernel-bench's scan, scan + top-k and whole sparse
# layer rows (and the rest of its output) for SmolLM2's layer (9 q / 3 KV heads, head_dim 64,
# 4 x 6K tokens, budget 512, page_kt) and Llama-3-8B's (32 q / 8 KV heads, head_dim 128,
# 1 x 32K, budget 4096): SHAPES, default "smol".
#   K=DIR bash run.sh OUT_DIR [ROUNDS]
# K holds kb_<arm> for each arm of ARMS (default "base new"; Release, -DMEMPIPE_GPU=off
# -DMEMPIPE_XRT=off) and, where the machine lacks Abseil, lib/ with the libraries `ldd` lists.
# THREADS (default "1 2"), DTYPES (default "bf16 fp32"); DEADLINE (seconds) skips the runs that
# would start after it. Prints summary.txt: per run, the scan's, scan + top-k's and the sparse
# layer's wall time per layer and median % of the same run's read.
set -uo pipefail
O=${1:?output directory}; K=${K:?directory of the kb_<arm> binaries}; mkdir -p "$O"; T0=$SECONDS
export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
lscpu > "$O/lscpu.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --budget=512 --passes=5 --kv_layout=page_kt"
LLAMA_ARGS="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --seqs=1 --budget=4096 --passes=3 --kv_layout=page_kt"
one() { local name=$1; shift
  if [ -n "${DEADLINE:-}" ] && [ $((SECONDS - T0)) -gt "$DEADLINE" ]; then
    echo "skip $name (deadline)" >> "$O/runs.txt"; return; fi
  { uptime; timeout 300 "$@"; } > "$O/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" | tee -a "$O/runs.txt" >&2; }
for r in $(seq 1 "${2:-3}"); do
  for t in ${THREADS:-1 2}; do
    for dt in ${DTYPES:-bf16 fp32}; do
      for a in ${ARMS:-base new}; do
        for sh in ${SHAPES:-smol}; do
          args=$SMOL; [ "$sh" = llama ] && args=$LLAMA_ARGS
          one "${sh}_${dt}_t${t}_${a}_$r" "$K/kb_$a" $args --dtype=$dt --threads=$t
        done
      done
    done
  done
done
for f in "$O"/*.log; do printf "%-24s" "$(basename "$f" .log)"
  for k in "relevancy scan (digests), wall" "scan + top-k, one call, wall" "sparse attention, wall" "sparse layer, one call, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "ms") { p = $(i+5); if (p !~ /%/) p = "-"; printf " %s (%s)", $(i-1), p; break }}'
  done; echo; done > "$O/summary.txt"
cat "$O/summary.txt"
