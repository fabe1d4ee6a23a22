#!/usr/bin/env bash
# The H200 host's CPU at 15b6000: (1) what a 2 MiB page costs there (../collapse_share/
# hugepage_cost.c), (2) the decode kernels against the same run's read (mempipe-cpu-kernel-bench),
# (3) sparse decode's fixed cost per call: budget 64 (two pages per sequence and KV head, 192 KiB)
# at 1-16 threads. Carried: .gpuwork/snap (kb = the bench, lib/ = the Abseil libraries it links).
#   bash integration/bench/results/h200_dec5/run.sh   (writes $OUT/h200_dec5.tgz)
set -uo pipefail
K=$PWD/.gpuwork/snap; export LD_LIBRARY_PATH=$K/lib
W=/tmp/h200_dec5; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt; cat /proc/cmdline > $W/cmdline.txt
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag \
  > $W/thp.txt 2>&1; systemd-detect-virt >> $W/cmdline.txt 2>&1
cc -O2 -o $W/hugepage_cost integration/bench/results/collapse_share/hugepage_cost.c &&
  $W/hugepage_cost 512 4 > $W/hugepage_cost.log 2>&1
echo "hugepage_cost rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
one() {  # name args...
  local name=$1; shift
  [ $((SECONDS - T0)) -gt ${DEADLINE:-540} ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 90 "$K/kb" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in 1 2; do
  for th in 1 2 16; do
    for L in page_kt head; do
      one "smol_bf16_t${th}_${L}_$r" $SMOL --budget=512 --dtype=bf16 --threads=$th --kv_layout=$L
    done
  done
  for th in 1 2 4 8 16; do
    one "probe_b64_t${th}_$r" $SMOL --budget=64 --dtype=bf16 --threads=$th --kv_layout=page_kt
  done
  for th in 2 16; do
    one "llama_bf16_t${th}_page_kt_$r" $LLAMA --dtype=bf16 --threads=$th --kv_layout=page_kt
  done
  echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
done
tar -czf "$OUT/h200_dec5.tgz" -C /tmp h200_dec5; tail -3 $W/runs.txt
