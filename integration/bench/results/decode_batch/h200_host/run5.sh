#!/usr/bin/env bash
# H200 host, CPU only: bb7edce (base, with a68070d's --seqs bench) vs a68070d, served shapes.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  timeout 150 $X/$b --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --layers=16"
for r in 1 2 3; do
  for b in kb_base kb_new; do
    k smol4_fp32_t16_${b}_$r $b $S --dtype=fp32 --threads=16
    k smol4_fp32_t4_${b}_$r $b $S --dtype=fp32 --threads=4
    k smol4_bf16_t16_${b}_$r $b $S --dtype=bf16 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
  done
done
tar -czf $OUT/run5.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
