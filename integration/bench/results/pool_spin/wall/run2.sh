#!/usr/bin/env bash
# H200 host, CPU only, both clocks: 83ed42a's pool (kb_wall) against the spin-then-sleep pool
# (kb_wall_spin, experiments/pool_spin_83ed42a.diff, 50 us) and the same with
# MEMPIPE_POOL_SPIN_US=0 (kb_wall_spin0). Same bench source (wall-clock table); order rotates.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  local bin=$b env=()
  if [ $b = kb_wall_spin0 ]; then bin=kb_wall_spin; env=(MEMPIPE_POOL_SPIN_US=0); fi
  env "${env[@]}" timeout 100 $X/$bin --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=16"
order=(kb_wall kb_wall_spin kb_wall_spin0)
for r in 1 2 3 4; do
  for i in 0 1 2; do
    b=${order[$(( (i + r) % 3 ))]}
    k smol4_bf16_t16_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=16
    k smol4_fp32_t16_${b}_$r $b $S --seqs=4 --dtype=fp32 --threads=16
    k smol4_bf16_t4_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=4
    k smol1_bf16_t16_${b}_$r $b $S --seqs=1 --dtype=bf16 --threads=16
    k llama1_t16_${b}_$r $b --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
  done
done
tar -czf $OUT/wall_run2.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
