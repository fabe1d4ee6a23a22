#!/usr/bin/env bash
# H200 host, CPU only: the pool's spin-then-sleep waits (kb_pool_spin) against 83ed42a's
# sleep-at-once pool (kb_pool_base), and the new binary with MEMPIPE_POOL_SPIN_US=0
# (kb_pool_spin0: same code, spin 0). Alternated; binaries in rotating order each repetition.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
lscpu > $OUT/r/lscpu.txt
k() { local n=$1 b=$2; shift 2
  local bin=$b env=()
  if [ $b = kb_pool_spin0 ]; then bin=kb_pool_spin; env=(MEMPIPE_POOL_SPIN_US=0); fi
  env "${env[@]}" timeout 100 $X/$bin --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --layers=16"
order=(kb_pool_base kb_pool_spin kb_pool_spin0)
for r in 1 2 3 4; do
  for i in 0 1 2; do
    b=${order[$(( (i + r) % 3 ))]}
    k smol4_bf16_t16_${b}_$r $b $S --dtype=bf16 --threads=16
    k smol4_fp32_t16_${b}_$r $b $S --dtype=fp32 --threads=16
    k smol4_bf16_t8_${b}_$r $b $S --dtype=bf16 --threads=8
    k smol1_bf16_t16_${b}_$r $b ${S/--seqs=4/--seqs=1} --dtype=bf16 --threads=16
    k llama1_t16_${b}_$r $b --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
  done
done
tar -czf $OUT/run1.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
