#!/usr/bin/env bash
# Third call: SmolLM2 fp32 and Llama-3-8B bf16 over head and the transposed layouts, alternated.
# Carried: .gpuwork/kt.  bash integration/bench/results/keys_transposed/h200_host3.sh
set -uo pipefail
K=$PWD/.gpuwork/kt; export LD_LIBRARY_PATH=$K/lib
W=/tmp/kt_h200c; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
one() {  # name args...
  local name=$1; shift
  [ $((SECONDS - T0)) -gt 540 ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 60 "$K/mempipe-cpu-kernel-bench" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in 1 2 3; do
  for th in 1 2; do
    for L in head page_kt; do one "smol_fp32_t${th}_${L}_$r" $SMOL --dtype=fp32 --threads=$th --kv_layout=$L; done
  done
done
for r in 1 2; do
  for th in 2 16; do
    for L in head page_kt head_kt; do one "llama_bf16_t${th}_${L}_$r" $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L; done
  done
done
tar -czf "$OUT/kt_h200c.tgz" -C /tmp kt_h200c; tail -3 $W/runs.txt
