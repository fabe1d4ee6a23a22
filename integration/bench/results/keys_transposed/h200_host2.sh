#!/usr/bin/env bash
# Second call: SmolLM2 4 x 6K over all four host layouts at 1 and 2 threads, 3 alternated rounds.
# Carried: .gpuwork/kt.  bash integration/bench/results/keys_transposed/h200_host2.sh
set -uo pipefail
K=$PWD/.gpuwork/kt; export LD_LIBRARY_PATH=$K/lib
W=/tmp/kt_h200b; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
for r in 1 2 3; do
  for th in 1 2; do
    for L in head page head_kt page_kt; do
      [ $((SECONDS - T0)) -gt 540 ] && break 3
      timeout 60 "$K/mempipe-cpu-kernel-bench" $SMOL --dtype=bf16 --threads=$th --kv_layout=$L --passes=5 \
        > "$W/smol_bf16_t${th}_${L}_$r.log" 2>&1
      echo "smol_bf16_t${th}_${L}_$r rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
    done
  done
done
tar -czf "$OUT/kt_h200b.tgz" -C /tmp kt_h200b; tail -3 $W/runs.txt
