#!/usr/bin/env bash
# For the GPU machine's host CPU (16 vCPUs): mempipe's pool before and after the per-task lines
# (README.md), alternated in each round: `empty parallel call` (the pool's floor per call) and
# decode layers at 16 threads on the pool, and the same shapes on libgomp's team (the vLLM
# plugin's; the change does not touch it) as the run's reference. Carry .gpuwork/snap with
# kb_<arm> for each arm of ARMS (mempipe-cpu-kernel-bench, Release, -DMEMPIPE_GPU=off
# -DMEMPIPE_XRT=off; README.md names the commits) and lib/ (the Abseil libraries `ldd` lists):
#   ARMS="base v1 v2" OUT=$OUT bash integration/bench/results/pool_lines/device.sh [ROUNDS]
# The libgomp reference runs on the last arm. PLAN=threads runs SmolLM2 bf16 alone on the pool at
# THREADS (default "2 4 8 16") threads for each arm, and no reference.
# DEADLINE (seconds, default 420) skips the runs that would start after it.
set -uo pipefail
O=/tmp/pool_lines; K=${SNAP:-.gpuwork/snap}; mkdir -p "$O"; T0=$SECONDS
export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
lscpu > "$O/lscpu.txt"; uptime > "$O/uptime.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --budget=512 --dtype=bf16 --passes=7 --kv_layout=page_kt --threads=16"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --seqs=1 --budget=4096 --dtype=bf16 --passes=5 --kv_layout=page_kt --threads=16"
SMOL32=${SMOL/bf16/fp32}
one() { local name=$1; shift
  [ $((SECONDS - T0)) -gt "${DEADLINE:-420}" ] && { echo "skip $name (deadline)" >> "$O/runs.txt"; return; }
  timeout 120 "$@" > "$O/$name.log" 2>&1; echo "$name rc=$? at $((SECONDS - T0)) s" >> "$O/runs.txt"; }
for r in $(seq 1 "${1:-3}"); do
  if [ "${PLAN:-shapes}" = threads ]; then
    for t in ${THREADS:-2 4 8 16}; do
      for b in ${ARMS:-base v1}; do one "smol_${b}_t${t}_$r" "$K/kb_$b" ${SMOL/threads=16/threads=$t}; done
    done; continue
  fi
  for b in ${ARMS:-base v1}; do
    one "smol_${b}_$r" "$K/kb_$b" $SMOL
    one "llama_${b}_$r" "$K/kb_$b" $LLAMA
    one "smol32_${b}_$r" "$K/kb_$b" $SMOL32
  done
  one "smol_omp_$r" "$K/kb_${b}" $SMOL --host_threads=openmp
done
for f in "$O"/*.log; do printf "%-20s" "$(basename "$f" .log)"
  for k in "sparse attention, wall" "sparse layer, one call, wall" "dense attention, wall" "empty parallel call, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "ms") { p = $(i+5); if (p !~ /%/) p = "-"; printf " %s (%s)", $(i-1), p; break }}'
  done; echo; done > "$O/summary.txt"
cat "$O/summary.txt"; tar czf "${OUT:-/tmp}/$(basename "$O").tgz" -C /tmp "$(basename "$O")"
