#!/usr/bin/env bash
# Call 3: (a) the landed fix for call 2's finding (core/host_parallel_runtime.cc: every call asks
# libgomp for the largest team any call has asked for) against the build before it, both on
# libgomp's team at 16 threads; (b) the relevancy scan before and after ../scan_l2/ on this Xeon
# at 1 and 2 threads. Carried: .gpuwork/snap (kb2: f2546b3's bench; kb4: scan_l2 + the pool's
# spin, team sizes as asked; kb6: kb4 + the one-size team).   DEADLINE=200 bash .../team_and_scan.sh 3
set -uo pipefail
K=$PWD/.gpuwork/snap; export LD_LIBRARY_PATH=$K/lib
W=/tmp/team_and_scan; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16 --budget=512 --kv_layout=head"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1 --dtype=bf16 --kv_layout=page_kt"
one() {  # name binary args...
  local name=$1 bin=$2; shift 2
  [ $((SECONDS - T0)) -gt ${DEADLINE:-200} ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  timeout 60 "$K/$bin" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in $(seq 1 "${1:-3}"); do
  for b in kb4 kb6; do
    one "smol_t16_omp_${b}_$r" $b $SMOL --threads=16 --host_threads=openmp
    one "llama_t16_omp_${b}_$r" $b $LLAMA --threads=16 --host_threads=openmp
  done
  for b in kb2 kb4; do
    for t in 1 2; do one "smol_t${t}_${b}_$r" $b $SMOL --threads=$t; done
    one "llama_t2_${b}_$r" $b $LLAMA --threads=2 --layers=6
  done
  echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
done
tar -czf "$OUT/team_and_scan.tgz" -C /tmp team_and_scan; tail -2 $W/runs.txt
