#!/usr/bin/env bash
# Why the relevancy scan ran 3-4x slower on libgomp's team than on mempipe's pool at 16 threads
# (run.sh's first call): the scan asks the team for 16 threads and top-k, called after it on every
# layer, for 12 (SmolLM2) or 8 (Llama); does a team of one size throughout change that? kb5 is kb4
# with MEMPIPE_OMP_TEAM=N (an experiment, not landed) asking GOMP_parallel for N threads on every
# call. Carried: .gpuwork/snap.   DEADLINE=150 bash .../omp_team.sh 3   ($OUT/omp_team.tgz)
set -uo pipefail
K=$PWD/.gpuwork/snap; export LD_LIBRARY_PATH=$K/lib
W=/tmp/omp_team; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --dtype=bf16 --budget=512 --kv_layout=head"
LLAMA="--num_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --context=32768 --budget=4096 --seqs=1 --dtype=bf16 --kv_layout=page_kt"
one() {  # name env binary args...
  local name=$1 env=$2 bin=$3; shift 3
  [ $((SECONDS - T0)) -gt ${DEADLINE:-150} ] && { echo "skip $name (deadline)" >> $W/runs.txt; return; }
  env $env timeout 60 "$K/$bin" "$@" --passes=5 > "$W/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - T0)) s" >> $W/runs.txt
}
for r in $(seq 1 "${1:-3}"); do
  one "smol_t16_omp_$r" MEMPIPE_POOL_SPIN_US=50 kb5 $SMOL --threads=16 --host_threads=openmp
  one "smol_t16_omp16_$r" MEMPIPE_OMP_TEAM=16 kb5 $SMOL --threads=16 --host_threads=openmp
  one "smol_t12_omp_$r" MEMPIPE_POOL_SPIN_US=50 kb5 $SMOL --threads=12 --host_threads=openmp
  one "smol_t16_keep_$r" MEMPIPE_POOL_SPIN_US=50 kb5 $SMOL --threads=16 --host_threads=pool
  one "llama_t16_omp_$r" MEMPIPE_POOL_SPIN_US=50 kb5 $LLAMA --threads=16 --host_threads=openmp
  one "llama_t16_omp16_$r" MEMPIPE_OMP_TEAM=16 kb5 $LLAMA --threads=16 --host_threads=openmp
  echo "round $r done at $((SECONDS - T0)) s" >> $W/runs.txt
done
tar -czf "$OUT/omp_team.tgz" -C /tmp omp_team; tail -2 $W/runs.txt
