#!/usr/bin/env bash
# H200 host, CPU only (16 vCPUs of an Emerald Rapids under KVM), a fresh machine: the decode
# kernels against the read from DRAM with CPU time from each thread's own clock (ThreadsCpuMs),
# the shapes of results/dram_read/h200_host/run2.sh, 3 repetitions; then .ci/bench's main job.
# Binaries from a Release build on the build VM in .gpuwork/xeon, Abseil's libraries in
# .gpuwork/deps/lib (the device has none).
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
ldd $X/mempipe-bench > $OUT/r/ldd_mb.txt 2>&1
lscpu > $OUT/r/lscpu.txt
$X/core_clock_test > $OUT/r/clock_test.txt 2>&1; echo "clock_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
timeout 100 $X/mempipe-membw --mib=256,2048 --threads=1,16 > $OUT/r/membw.txt 2>/dev/null
echo "membw rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
k() { local n=$1; shift
  timeout 100 $X/mempipe-cpu-kernel-bench --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
for r in 1 2 3; do
  k llama1_t16_$r --threads=16
  k llama4_t16_$r --seqs=4 --threads=16
  k llama1_fp32_t16_$r --dtype=fp32 --threads=16
  k smol4_bf16_t16_$r $S --dtype=bf16 --threads=16
  k smol4_fp32_t16_$r $S --dtype=fp32 --threads=16
  k smol4_bf16_t2_$r $S --dtype=bf16 --threads=2
  k llama1_t1_$r --threads=1
  k smol4_bf16_t1_$r $S --dtype=bf16 --threads=1
  [ $((SECONDS-T0)) -gt 300 ] && break
done
timeout 200 $X/mempipe-bench --json=$OUT/r/mb.json > $OUT/r/mb.log 2> $OUT/r/mb.err
echo "mb rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
tar -czf $OUT/run.tgz -C $OUT r && rm -rf $OUT/r; echo done
