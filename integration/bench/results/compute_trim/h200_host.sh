#!/usr/bin/env bash
# The H200 host's CPU: mempipe-cpu-kernel-bench before (kb_old) and after (kb_new) a change,
# alternated in each round. Carried: .gpuwork/NAME (both binaries, lib/ the Abseil libraries they
# link); writes $OUT/NAME_h200.tgz.   bash integration/bench/results/compute_trim/h200_host.sh [NAME]
# Runs: NAME ca (the compute trims: 137111e against 0c8e656), ds (../dense_stream/: 0c8e656
# against af3f896).
set -uo pipefail
N=${1:-ca}
K=$PWD/.gpuwork/$N; export LD_LIBRARY_PATH=$K/lib
W=/tmp/${N}_h200; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
one() {  # name binary args...
  local name=$1 kb=$2; shift 2
  [ $((SECONDS - T0)) -gt ${DEADLINE:-480} ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 60 "$K/$kb" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in 1 2 3; do
  for th in 2 16; do
    for L in head_kt page_kt; do
      for b in old new; do
        one "llama_bf16_t${th}_${L}_${b}_$r" kb_$b $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L
      done
    done
  done
  for th in 1 2 16; do
    for L in head page_kt; do
      for b in old new; do
        one "smol_bf16_t${th}_${L}_${b}_$r" kb_$b $SMOL --dtype=bf16 --threads=$th --kv_layout=$L
      done
    done
  done
  echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
done
tar -czf "$OUT/${N}_h200.tgz" -C /tmp ${N}_h200; tail -3 $W/runs.txt
