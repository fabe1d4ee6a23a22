#!/usr/bin/env bash
# Sparse decode's read-ahead stream on the H200 host's CPU: the kernel bench before it (kb_old,
# 3d1b424) and with it (kb_new), alternated; then the stream's distance and hint (kb_knob, the
# same code with RA_BYTES / RA_T0 read from the environment, not landed).
# Carried: .gpuwork/ra (the three benches and the shared libraries they link).
#   bash integration/bench/results/read_ahead/h200_host.sh
set -uo pipefail
K=$PWD/.gpuwork/ra; export LD_LIBRARY_PATH=$K/lib
W=/tmp/ra_h200; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1"
one() {  # name binary args...
  local name=$1 bin=$2; shift 2
  [ $((SECONDS - T0)) -gt 520 ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 60 "$K/$bin" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in 1 2 3; do
  for th in 1 2 16; do
    for L in head page_kt; do
      for b in old new; do one "smol_bf16_t${th}_${L}_${b}_$r" kb_$b $SMOL --dtype=bf16 --threads=$th --kv_layout=$L; done
    done
  done
done
for r in 1 2; do
  for th in 2 16; do
    for L in head_kt page_kt; do
      for b in old new; do one "llama_bf16_t${th}_${L}_${b}_$r" kb_$b $LLAMA --dtype=bf16 --threads=$th --kv_layout=$L; done
    done
  done
done
for r in 1 2; do
  for th in 1 2; do
    for v in 8192 24576 T0; do
      if [ $v = T0 ]; then
        RA_T0=1 RA_BYTES=12288 one "knob_smol_t${th}_${v}_$r" kb_knob $SMOL --dtype=bf16 --threads=$th --kv_layout=page_kt
      else
        RA_BYTES=$v one "knob_smol_t${th}_${v}_$r" kb_knob $SMOL --dtype=bf16 --threads=$th --kv_layout=page_kt
      fi
    done
  done
done
tar -czf "$OUT/ra_h200.tgz" -C /tmp ra_h200; tail -3 $W/runs.txt
