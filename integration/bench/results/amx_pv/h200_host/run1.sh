#!/usr/bin/env bash
# H200 host, CPU only: P.V on AMX tiles (avx512-amx) against fp32 FMAs (avx512-bf16), same binary.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
lscpu > $OUT/r/lscpu.txt; grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort | uniq -c > $OUT/r/amx_flags.txt
timeout 200 $X/dt --gtest_brief=1 > $OUT/r/decode_test.txt 2>&1; echo "decode_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
grep -c "avx512_amx" $OUT/r/decode_test.txt >> $OUT/r/runs.txt
timeout 60 $X/dt --gtest_filter='DecodeAmx.*:*d128_g3_avx512_amx*' > $OUT/r/decode_amx_verbose.txt 2>&1; echo "amx verbose rc=$?" >> $OUT/r/runs.txt
k() { local n=$1 kern=$2; shift 2
  timeout 100 $X/kb --passes=5 --kv_layout=head --cpu_kernel=$kern "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --layers=16"
order=(avx512-bf16 avx512-amx)
for r in 1 2 3; do
  for i in 0 1; do
    b=${order[$(( (i + r) % 2 ))]}
    k llama1_t16_${b}_$r $b --layers=8 --threads=16
    k llama4_t16_${b}_$r $b --seqs=4 --layers=4 --threads=16
    k smol4_bf16_t16_${b}_$r $b $S --dtype=bf16 --threads=16
    k llama1_t1_${b}_$r $b --layers=2 --threads=1
    k smol4_bf16_t1_${b}_$r $b $S --dtype=bf16 --threads=1 --layers=4
  done
  [ $((SECONDS-T0)) -gt 480 ] && break
done
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
