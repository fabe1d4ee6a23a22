#!/usr/bin/env bash
# H200 host, CPU only: 6b3a527 (head) vs batch 64 (b64) vs batch 64 with V prefetched to L1
# (vt0b64); the binaries' order rotates every repetition.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  timeout 100 $X/$b --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --layers=16"
orders=("kb_head kb_b64 kb_vt0b64" "kb_b64 kb_vt0b64 kb_head" "kb_vt0b64 kb_head kb_b64" "kb_head kb_vt0b64 kb_b64" "kb_b64 kb_head kb_vt0b64" "kb_vt0b64 kb_b64 kb_head")
for r in 1 2 3 4 5 6; do
  for b in ${orders[$((r-1))]}; do
    k llama1_t1_${b}_$r $b --layers=4 --threads=1 --passes=3
    k llama1_t16_${b}_$r $b --layers=8 --threads=16 --passes=5
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16 --passes=5
    k smol4_bf16_t16_${b}_$r $b $S --dtype=bf16 --threads=16 --passes=5
    k smol4_fp32_t16_${b}_$r $b $S --dtype=fp32 --threads=16 --passes=5
  done
done
tar -czf $OUT/run10.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
