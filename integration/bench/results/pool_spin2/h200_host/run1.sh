#!/usr/bin/env bash
# H200 host, CPU only: the host thread pool as it was (base, 541ebfb) against the spinning pool
# (spin: plain loads, 50 us; spinp: the same with a pause hint in the loop; spin0: the spin
# binary with MEMPIPE_POOL_SPIN_US=0), arms rotated per repetition. Kernel bench (kb) shapes
# and mempipe-bench's default (mb: Llama-3-8B shape, 32 layers x 32K, dense and cpu).
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
nproc > $OUT/r/nproc.txt; lscpu > $OUT/r/lscpu.txt
arm() {  # arm name -> binary suffix and environment
  case $1 in base) echo "base";; spin) echo "spin";; spinp) echo "spinp";; spin0) echo "spin";; esac; }
k() { local a=$1 n=$2; shift 2
  local env=""; [ $a = spin0 ] && env="MEMPIPE_POOL_SPIN_US=0"
  env $env timeout 60 $X/kb_$(arm $a) --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/${n}_$a.log
  echo "$n $a rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
m() { local a=$1 r=$2; local env=""; [ $a = spin0 ] && env="MEMPIPE_POOL_SPIN_US=0"
  local b=$a; [ $a = spinp ] && return; [ $a = spin0 ] && b=spin
  env $env timeout 90 $X/mb_$b --json=$OUT/r/mb_${a}_$r.json > $OUT/r/mb_${a}_$r.log 2> $OUT/r/mb_${a}_$r.err
  echo "mb $a $r rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512"
ARMS=(base spin spinp spin0)
for r in 1 2 3 4; do
  for i in 0 1 2 3; do
    a=${ARMS[$(( (i + r) % 4 ))]}
    k $a smol4_bf16_t16_$r $S --seqs=4 --dtype=bf16 --threads=16
    k $a smol4_fp32_t16_$r $S --seqs=4 --dtype=fp32 --threads=16
    k $a smol1_bf16_t16_$r $S --seqs=1 --dtype=bf16 --threads=16
    k $a smol4_bf16_t4_$r $S --seqs=4 --dtype=bf16 --threads=4
    k $a llama1_t16_$r --threads=16
    k $a llama4_t16_$r --seqs=4 --threads=16
    [ $r -le 2 ] && m $a $r
  done
  [ $((SECONDS-T0)) -gt 480 ] && break
done
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
