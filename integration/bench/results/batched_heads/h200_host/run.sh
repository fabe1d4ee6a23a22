#!/usr/bin/env bash
# H200 host, CPU only (session 15): (1) the decode and relevancy tests of the BatchedHeads /
# PageDigestRows refactor with AVX-512 present (the build VM, a Zen 1, has none); (2) its kernel
# bench against 4927997 (base), arms alternating, avx512 and avx512-bf16 kernels.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
R=$OUT/r; mkdir -p $R; T0=$SECONDS
nproc > $R/nproc.txt; lscpu > $R/lscpu.txt
grep -o 'avx512[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort | uniq -c > $R/flags.txt
for t in decode_test relevancy_test; do
  timeout 400 $X/$t --gtest_brief=1 > $R/$t.log 2>&1; echo "$t rc=$? at $((SECONDS-T0)) s" >> $R/runs.txt
  grep -E "PASSED|FAILED|SKIPPED \] [0-9]" $R/$t.log >> $R/runs.txt
done
k() { local a=$1 n=$2; shift 2
  timeout 60 $X/kb_$a --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $R/${n}_$a.log
  echo "$n $a rc=$? at $((SECONDS-T0)) s" >> $R/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512"
for r in 1 2 3; do
  for a in base new; do
    [ $r = 2 ] && a=$([ $a = base ] && echo new || echo base)
    k $a smol4_bf16_t2_$r $S --seqs=4 --dtype=bf16 --threads=2
    k $a smol4_bf16_t2_avx512_$r $S --seqs=4 --dtype=bf16 --threads=2 --cpu_kernel=avx512
    k $a smol4_fp32_t2_$r $S --seqs=4 --dtype=fp32 --threads=2
    k $a llama1_t2_$r --threads=2
    k $a llama1_t2_avx2_$r --threads=2 --cpu_kernel=avx2
  done
  [ $((SECONDS-T0)) -gt 450 ] && break
done
tar -czf $OUT/run.tgz -C $OUT r; tail -4 $R/runs.txt
