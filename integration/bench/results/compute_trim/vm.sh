#!/usr/bin/env bash
# Old against new mempipe-cpu-kernel-bench, alternated in each round, on the build VM.
#   vm.sh OLD NEW OUT ROUNDS THREADS...   (used: vm.sh kb_old kb_new vm_logs 3 1 2)
set -uo pipefail
OLD=$1; NEW=$2; O=$3; R=$4; shift 4; TH="$*"
mkdir -p "$O"; lscpu > "$O/lscpu.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
for r in $(seq 1 "$R"); do
  for th in $TH; do
    for L in head page_kt; do
      for b in old new; do
        KB=$OLD; [ $b = new ] && KB=$NEW
        "$KB" $SMOL --dtype=bf16 --threads=$th --kv_layout=$L --passes=7 > "$O/smol_bf16_t${th}_${L}_${b}_$r.log" 2>&1
      done
    done
    for L in head_kt page_kt; do
      for b in old new; do
        KB=$OLD; [ $b = new ] && KB=$NEW
        "$KB" $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L --passes=5 > "$O/llama_bf16_t${th}_${L}_${b}_$r.log" 2>&1
      done
    done
  done
  echo "round $r done $(date -u +%H:%M:%S)"
done
