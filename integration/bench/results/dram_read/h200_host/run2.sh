#!/usr/bin/env bash
# H200 host, CPU only, a fresh machine: run1.sh's shapes with the new defaults only (read and
# layers past the L3), then .ci/bench's main job (mempipe-bench, defaults: Llama-3-8B shape,
# 32 layers x 32K, dense and cpu placements, all 16 threads) as mb.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
timeout 100 $X/mw --mib=256,2048 --threads=1,16 > $OUT/r/membw_1.txt 2>/dev/null
echo "membw rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
k() { local n=$1; shift
  timeout 100 $X/kb --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
for r in 1 2 3 4; do
  k llama1_t16_$r --threads=16
  k llama4_t16_$r --seqs=4 --threads=16
  k llama1_fp32_t16_$r --dtype=fp32 --threads=16
  k smol4_bf16_t16_$r $S --dtype=bf16 --threads=16
  k smol4_fp32_t16_$r $S --dtype=fp32 --threads=16
  k llama1_t1_$r --threads=1
  k smol4_bf16_t1_$r $S --dtype=bf16 --threads=1
  [ $((SECONDS-T0)) -gt 300 ] && break
done
timeout 240 $X/mb --json=$OUT/r/mb.json > $OUT/r/mb.log 2> $OUT/r/mb.err
echo "mb rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
