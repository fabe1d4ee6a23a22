#!/usr/bin/env bash
# Sparse decode's two prefetch schemes (--sparse_read_ahead=stream / next_page) in one build of
# mempipe-cpu-kernel-bench, alternated within each round, on the build VM.
#   vm.sh PATH/TO/mempipe-cpu-kernel-bench OUT ROUNDS
set -uo pipefail
KB=$1; O=$2; R=${3:-3}
mkdir -p "$O"; lscpu > "$O/lscpu.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
for r in $(seq 1 "$R"); do
  for th in 1 2; do
    for L in head page_kt; do
      for m in next_page stream; do
        "$KB" $SMOL --dtype=bf16 --threads=$th --kv_layout=$L --sparse_read_ahead=$m --passes=7 \
          > "$O/smol_bf16_t${th}_${L}_${m}_$r.log" 2>&1
      done
    done
    for m in next_page stream; do
      "$KB" $SMOL --dtype=fp32 --threads=$th --kv_layout=head --sparse_read_ahead=$m --passes=7 \
        > "$O/smol_fp32_t${th}_head_${m}_$r.log" 2>&1
      "$KB" $LLAMA --dtype=bf16 --threads=$th --kv_layout=head_kt --sparse_read_ahead=$m --passes=5 \
        > "$O/llama_bf16_t${th}_head_kt_${m}_$r.log" 2>&1
    done
  done
  echo "round $r done $(date -u +%H:%M:%S)"
done
