#!/usr/bin/env bash
# Third call: the landed build (kb_final: the stream 8 KiB ahead) with --sparse_read_ahead=next_page
# and stream, alternated, on the H200 host's CPU. Carried: .gpuwork/ra.
#   bash integration/bench/results/read_ahead/h200_host3.sh
set -uo pipefail
K=$PWD/.gpuwork/ra; export LD_LIBRARY_PATH=$K/lib
W=/tmp/ra_h200c; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
one() {  # name args...
  local name=$1; shift
  [ $((SECONDS - T0)) -gt 500 ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 60 "$K/kb_final" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in 1 2 3; do
  for th in 2 16; do
    for L in head_kt page_kt; do
      for m in next_page stream; do
        one "llama_t${th}_${L}_${m}_$r" $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L --sparse_read_ahead=$m
      done
    done
  done
  for th in 1 2 16; do
    for L in head page_kt; do
      for m in next_page stream; do
        one "smol_t${th}_${L}_${m}_$r" $SMOL --dtype=bf16 --threads=$th --kv_layout=$L --sparse_read_ahead=$m
      done
    done
  done
done
tar -czf "$OUT/ra_h200c.tgz" -C /tmp ra_h200c; tail -3 $W/runs.txt
