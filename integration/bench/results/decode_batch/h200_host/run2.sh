#!/usr/bin/env bash
# H200 host, CPU only: AMX scores. 1) decode tests (every kernel, AMX included); 2) kernels A/B.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
timeout 300 $X/decode_test --gtest_brief=1 > $OUT/r/decode_test.txt 2>&1; echo "decode_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
tail -4 $OUT/r/decode_test.txt
k() {  # name binary args...
  local n=$1 b=$2; shift 2
  timeout 120 $X/$b --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
}
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=30"
for r in 1 2 3; do
  for b in kb_base kb_new kb_amx; do
    k llama_${b}_$r $b --threads=16 --layers=8
    k llama_p32_${b}_$r $b --threads=16 --layers=8 --page_size=32
    k llama_t1_${b}_$r $b --threads=1 --layers=4
    k smol_bf16_t1_${b}_$r $b --threads=1 $S --dtype=bf16
  done
done
cd $OUT/r && for f in *.log; do echo "== $f"; grep -E "CPU time|attention|kernels" $f | sed 's/per layer, best of 5 passes, CPU time per thread; % of the read bandwidth (STREAM-like, //'; done > summary.txt
tar -czf $OUT/run2.tgz -C $OUT r; grep -c attention summary.txt; tail -1 runs.txt
