#!/usr/bin/env bash
# The pool's slot (core/thread_pool.h, Dispatch) against the pool before it and against libgomp's
# team, on the GPU machine's host CPU: sparse decode's fixed cost per call (budget 64, 192 KiB a
# layer) and SmolLM2's and Llama-3-8B's layers, at 2-16 threads, arms alternated per round.
# Carried: .gpuwork/snap (kb = mempipe-cpu-kernel-bench before the slot, kb2 = with it, both
# Release builds with -DMEMPIPE_GPU=off -DMEMPIPE_XRT=off; lib/ = the Abseil libraries they link).
#   DEADLINE=400 bash integration/bench/results/pool_slot/run.sh 3          (first call; $OUT/pool_slot.tgz)
#   FOCUS=1 SPIN1K=1 DEADLINE=300 bash integration/bench/results/pool_slot/run.sh 8   (second call)
# ARMS (name:binary:host_threads:spin_us ...) replaces the three arms; FOCUS=2 is the shapes of
# ../pool_keep_spinning/.
set -uo pipefail
K=$PWD/.gpuwork/snap; export LD_LIBRARY_PATH=$K/lib
W=/tmp/pool_slot; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1 --dtype=bf16"
one() {  # name binary args...
  local name=$1 bin=$2; shift 2
  [ $((SECONDS - T0)) -gt ${DEADLINE:-540} ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 90 "$K/$bin" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
arms() {  # name args...: the arms, in an order that rotates with the round
  local name=$1; shift
  local order=(${ARMS:-old:kb:pool:50 slot:kb2:pool:50 omp:kb2:openmp:50})
  [ "${SPIN1K:-0}" = 1 ] && order+=("slot1k:kb2:pool:1000")
  local n=${#order[@]}
  for k in $(seq 0 $((n - 1))); do
    local a=${order[$(( (k + r) % n ))]}; IFS=: read -r arm bin ht spin <<< "$a"
    MEMPIPE_POOL_SPIN_US=$spin one "${name}_${arm}_$r" "$bin" "$@" --host_threads=$ht
  done
}
if [ "${FOCUS:-0}" = 2 ]; then  # 8 and 16 threads, both layouts, Llama (../pool_keep_spinning/)
  for r in $(seq 1 "${1:-3}"); do
    for th in 16 8; do arms "probe_t$th" $SMOL --budget=64 --threads=$th --kv_layout=page_kt; done
    for L in page_kt head; do arms "smol_t16_$L" $SMOL --budget=512 --threads=16 --kv_layout=$L; done
    arms "llama_t16" $LLAMA --threads=16 --kv_layout=page_kt
    echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
  done
  tar -czf "$OUT/pool_slot.tgz" -C /tmp pool_slot; tail -3 $W/runs.txt
  exit 0
fi
if [ "${FOCUS:-0}" = 1 ]; then  # the 16-thread layers only, more rounds (the second call)
  for r in $(seq 1 "${1:-6}"); do
    arms "probe_t16" $SMOL --budget=64 --threads=16 --kv_layout=page_kt
    arms "smol_t16_page_kt" $SMOL --budget=512 --threads=16 --kv_layout=page_kt
    echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
  done
  tar -czf "$OUT/pool_slot.tgz" -C /tmp pool_slot; tail -3 $W/runs.txt
  exit 0
fi
for r in $(seq 1 "${1:-2}"); do
  for th in 16 8 4 2; do arms "probe_t$th" $SMOL --budget=64 --threads=$th --kv_layout=page_kt; done
  for th in 16 2; do
    for L in page_kt head; do arms "smol_t${th}_$L" $SMOL --budget=512 --threads=$th --kv_layout=$L; done
  done
  arms "llama_t16" $LLAMA --threads=16 --kv_layout=page_kt
  echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
done
tar -czf "$OUT/pool_slot.tgz" -C /tmp pool_slot; tail -3 $W/runs.txt
