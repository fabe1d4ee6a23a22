#!/usr/bin/env bash
# H200 host, CPU only, 16 threads: decode chunk sizes (kDecodeChunkTokens 256/512/1024/2048:
# kb_c256..kb_c2048) and, at 512, sparse decode prefetching the next KV head's first page at the
# last page of a head (kb_c512x). All other code as 83ed42a. Binaries' order rotates.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 b=$2; shift 2
  timeout 100 $X/$b --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=16"
order=(kb_c512 kb_c256 kb_c1024 kb_c2048 kb_c512x)
for r in 1 2 3; do
  for i in 0 1 2 3 4; do
    b=${order[$(( (i + r) % 5 ))]}
    k llama1_t16_${b}_$r $b --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
    k smol4_bf16_t16_${b}_$r $b $S --seqs=4 --dtype=bf16 --threads=16
    k smol1_bf16_t16_${b}_$r $b $S --seqs=1 --dtype=bf16 --threads=16
  done
done
tar -czf $OUT/chunk_run1.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
