#!/usr/bin/env bash
# H200 host, CPU only, main's kernels: token-major vs head-major KV layout, alternated.
D=$PWD/.gpuwork/deps/usr
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu
X=$PWD/.gpuwork/final/xeon
mkdir -p $OUT/r; T0=$SECONDS
lscpu > $OUT/r/lscpu.txt
k() {  # name args...
  local n=$1; shift
  timeout 120 $X/final --passes=5 "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
}
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=30"
for r in 1 2 3; do
  for L in token head; do
    k llama_${L}_$r --threads=16 --layers=8 --kv_layout=$L
    k llama_p32_${L}_$r --threads=16 --layers=8 --page_size=32 --kv_layout=$L
    k smol_fp32_${L}_$r --threads=16 $S --dtype=fp32 --kv_layout=$L
    k smol_bf16_${L}_$r --threads=16 $S --dtype=bf16 --kv_layout=$L
  done
done
cd $OUT/r && for f in *.log; do echo "== $f"; grep -E "CPU time|attention" $f | sed 's/per layer, best of 5 passes, CPU time per thread; % of the read bandwidth (STREAM-like, //'; done > summary.txt
tar -czf $OUT/final.tgz -C $OUT r; grep -c attention summary.txt; tail -1 runs.txt
