#!/usr/bin/env bash
# H200 host, CPU only: the spinning pool as landed (kb_new, befbc1e + the bench header) over
# thread counts for SmolLM2's small layers, and over spin durations (MEMPIPE_POOL_SPIN_US).
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1; shift
  timeout 60 "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --kv_layout=head --passes=5"
for r in 1 2; do
  for t in 2 4 8 12 16; do
    k smol4_bf16_t${t}_$r $X/kb_new $S --seqs=4 --dtype=bf16 --threads=$t
    k smol4_fp32_t${t}_$r $X/kb_new $S --seqs=4 --dtype=fp32 --threads=$t
  done
  for sp in 0 20 50 200 1000; do
    k smol4_bf16_t16_sp${sp}_$r env MEMPIPE_POOL_SPIN_US=$sp $X/kb_new $S --seqs=4 --dtype=bf16 --threads=16
    k llama4_t16_sp${sp}_$r env MEMPIPE_POOL_SPIN_US=$sp $X/kb_new --kv_layout=head --passes=5 --seqs=4 --threads=16
  done
  [ $((SECONDS-T0)) -gt 400 ] && break
done
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
