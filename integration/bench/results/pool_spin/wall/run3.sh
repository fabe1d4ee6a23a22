#!/usr/bin/env bash
# H200 host, CPU only, both clocks: the kernels (83ed42a's) on mempipe's pool against the same
# binary on the system libgomp's team (--host_threads=openmp, as vLLM's backend runs them on
# torch's), kb_wall2 (read bandwidth without thread start-up). Order alternates.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  local h=pool; [ $b = kb_omp ] && h=openmp
  timeout 100 $X/kb_wall2 --host_threads=$h --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=16"
order=(kb_pool kb_omp)
for r in 1 2 3 4; do
  for i in 0 1; do
    b=${order[$(( (i + r) % 2 ))]}
    k smol4_bf16_t16_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=16
    k smol4_fp32_t16_${b}_$r $b $S --seqs=4 --dtype=fp32 --threads=16
    k smol4_bf16_t4_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=4
    k smol1_bf16_t16_${b}_$r $b $S --seqs=1 --dtype=bf16 --threads=16
    k llama1_t16_${b}_$r $b --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
  done
done
tar -czf $OUT/wall_run3.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
