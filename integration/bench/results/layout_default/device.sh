#!/usr/bin/env bash
# For the GPU machine's host CPU (16 vCPUs, AVX-512; run 2026-12-06, README section 4): the default layout
# on AVX-512 (page_kt) against head, SmolLM2 bf16 4 x 6K at 1, 2 and 16 threads on mempipe's pool
# and 16 on libgomp's team (the vLLM plugin's), and Llama-3-8B 1 x 32K at 16 on libgomp's team;
# with each run's `empty parallel call` (the runtime's floor per call). Carry .gpuwork/snap with
# kb_wake (mempipe-cpu-kernel-bench at 6126f14 or later, Release, -DMEMPIPE_GPU=off
# -DMEMPIPE_XRT=off) and lib/ (the Abseil libraries `ldd` lists):
#   OUT=$OUT bash integration/bench/results/layout_default/device.sh [ROUNDS]
# PLAN=dtypes instead runs both layouts at 16 threads only: Llama-3-8B bf16 on the pool and on
# libgomp's team, and Llama-3-8B and SmolLM2 in fp32 on both (README section 4's second call).
# PLAN=read_ahead: page_kt at 16 threads on libgomp's team, the kernels' prefetch (--read_ahead)
# stream (the default) against next_page, for Llama-3-8B bf16 and fp32 and SmolLM2 bf16.
set -uo pipefail
PLAN=${PLAN:-layouts}
case $PLAN in layouts) O=/tmp/ld_dev ;; dtypes) O=/tmp/ld_dtypes ;; read_ahead) O=/tmp/ld_read_ahead ;;
  *) echo "PLAN=$PLAN: expected layouts, dtypes or read_ahead" >&2; exit 2 ;; esac
K=${SNAP:-.gpuwork/snap}; mkdir -p "$O"; T0=$SECONDS
export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
lscpu > "$O/lscpu.txt"; uptime > "$O/uptime.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --budget=512 --dtype=bf16 --passes=7"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --seqs=1 --budget=4096 --dtype=bf16 --passes=5"
SMOL32=${SMOL/bf16/fp32}; LLAMA32=${LLAMA/bf16/fp32}
one() { local name=$1; shift
  [ $((SECONDS - T0)) -gt "${DEADLINE:-420}" ] && { echo "skip $name (deadline)" >> "$O/runs.txt"; return; }
  timeout 120 "$K/kb_wake" "$@" > "$O/$name.log" 2>&1; echo "$name rc=$? at $((SECONDS - T0)) s" >> "$O/runs.txt"; }
for r in $(seq 1 "${1:-3}"); do
  if [ "$PLAN" = read_ahead ]; then
    for ra in stream next_page; do
      one "llama_${ra}_$r" $LLAMA --kv_layout=page_kt --threads=16 --host_threads=openmp --read_ahead=$ra
      one "llama32_${ra}_$r" $LLAMA32 --kv_layout=page_kt --threads=16 --host_threads=openmp --read_ahead=$ra
      one "smol_${ra}_$r" $SMOL --kv_layout=page_kt --threads=16 --host_threads=openmp --read_ahead=$ra
    done; continue
  fi
  for L in head page_kt; do
    if [ "$PLAN" = dtypes ]; then
      for rt in pool openmp; do
        one "llama_${L}_t16${rt}_$r" $LLAMA --kv_layout=$L --threads=16 --host_threads=$rt
        one "llama32_${L}_t16${rt}_$r" $LLAMA32 --kv_layout=$L --threads=16 --host_threads=$rt
        one "smol32_${L}_t16${rt}_$r" $SMOL32 --kv_layout=$L --threads=16 --host_threads=$rt
      done; continue
    fi
    for t in 1 2 16; do one "smol_${L}_t${t}_$r" $SMOL --kv_layout=$L --threads=$t; done
    one "smol_${L}_t16omp_$r" $SMOL --kv_layout=$L --threads=16 --host_threads=openmp
    one "llama_${L}_t16omp_$r" $LLAMA --kv_layout=$L --threads=16 --host_threads=openmp
  done
done
for f in "$O"/*.log; do printf "%-24s" "$(basename "$f" .log)"
  for k in "sparse attention, wall" "sparse attention's reads, wall" "sparse layer, one call, wall" "dense attention, wall" "empty parallel call, wall"; do
    grep -F "  $k" "$f" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "ms") { p = $(i+5); if (p !~ /%/) p = "-"; printf " %s (%s)", $(i-1), p; break }}'
  done; echo; done > "$O/summary.txt"
cat "$O/summary.txt"; tar czf "${OUT:-/tmp}/$(basename "$O").tgz" -C /tmp "$(basename "$O")"
