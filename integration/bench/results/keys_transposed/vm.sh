#!/usr/bin/env bash
# The host kernels over head, page, head_kt and page_kt caches on the build VM, alternated.
#   vm.sh PATH/TO/mempipe-cpu-kernel-bench OUT ROUNDS
set -uo pipefail
KB=$1; O=$2; R=${3:-3}
mkdir -p "$O"; lscpu > "$O/lscpu.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
for r in $(seq 1 "$R"); do
  for th in 1 2; do
    for dt in bf16 fp32; do
      for L in head page head_kt page_kt; do
        "$KB" $SMOL --dtype=$dt --threads=$th --kv_layout=$L --passes=7 > "$O/smol_${dt}_t${th}_${L}_$r.log" 2>&1
      done
    done
    for L in head head_kt; do
      "$KB" $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L --passes=5 > "$O/llama_bf16_t${th}_${L}_$r.log" 2>&1
    done
  done
  echo "round $r done $(date -u +%H:%M:%S)"
done
