#!/usr/bin/env bash
# H200 host, CPU only: 6b3a527 (head) vs V prefetched to L1 (T0), batch 64, both.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  timeout 100 $X/$b --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --layers=16"
for r in 1 2 3; do
  for b in kb_head kb_vt0 kb_vt0b64 kb_kvt0b64 kb_b64; do
    k llama1_t1_${b}_$r $b --layers=4 --threads=1 --passes=3
    k llama1_t16_${b}_$r $b --layers=8 --threads=16 --passes=5
    k smol4_bf16_t16_${b}_$r $b $S --dtype=bf16 --threads=16 --passes=5
  done
done
tar -czf $OUT/run9.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
