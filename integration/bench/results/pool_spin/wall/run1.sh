#!/usr/bin/env bash
# H200 host, CPU only: mempipe-cpu-kernel-bench with its wall-clock table (kb_wall: 83ed42a's
# kernels and pool), served shapes on 16 threads (and SmolLM2 on 4 and 8), 3 repetitions.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  timeout 100 $X/$b --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=16"
for r in 1 2 3; do
  b=kb_wall
  k smol4_bf16_t16_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=16
  k smol4_fp32_t16_${b}_$r $b $S --seqs=4 --dtype=fp32 --threads=16
  k smol4_bf16_t8_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=8
  k smol4_bf16_t4_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=4
  k smol1_bf16_t16_${b}_$r $b $S --seqs=1 --dtype=bf16 --threads=16
  k llama1_t16_${b}_$r $b --layers=8 --threads=16
  k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
done
tar -czf $OUT/wall_run1.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
