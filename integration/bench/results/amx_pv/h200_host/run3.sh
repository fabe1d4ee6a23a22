#!/usr/bin/env bash
# H200 host, CPU only: P.V cost. avx512-bf16 (fp32 FMA P.V), avx512-amx (AMX P.V), and
# avx512-bf16 with P.V skipped (SKIP=2: softmax only; wrong output, timing only). Same binary.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() { local n=$1 v=$2; shift 2
  local env=() kern=avx512-bf16
  case $v in amx) kern=avx512-amx;; skip) env=(SKIP=2);; esac
  env "${env[@]}" timeout 100 $X/kb --kv_layout=head --cpu_kernel=$kern "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
timeout 200 $X/dt --gtest_brief=1 > $OUT/r/decode_test.txt 2>&1; echo "decode_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --budget=512 --layers=16"
order=(fma amx skip)
for r in 1 2 3; do
  for i in 0 1 2; do
    b=${order[$(( (i + r) % 3 ))]}
    k llama1_t16_${b}_$r $b --passes=5 --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --passes=5 --seqs=4 --layers=4 --threads=16
    k llama1_t1_${b}_$r $b --passes=5 --layers=2 --threads=1
    k llamaL3_t1_${b}_$r $b --passes=20 --layers=1 --context=4096 --budget=1024 --threads=1
    k smol4_t16_${b}_$r $b --passes=5 $S --context=6144 --seqs=4 --dtype=bf16 --threads=16
    k smolL3_t1_${b}_$r $b --passes=20 $S --context=6144 --seqs=4 --layers=1 --dtype=bf16 --threads=1
  done
  [ $((SECONDS-T0)) -gt 450 ] && break
done
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
