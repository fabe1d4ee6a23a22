#!/usr/bin/env bash
# int8 digests on the H200: the GPU differential tests (skip = failure) and mempipe-bench with
# native and int8 digests. Binaries built on the build VM (nvcc 13, sm_90) at the commit in REV.
D=$PWD/.gpuwork/deps/usr; B=$PWD/.gpuwork/int8
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "int8 branch at $(cat $B/REV)"; } | tee $OUT/device.txt
F='*Int8*:*BuildDigests*:*AppendKvAndDigests*:*RelevancyAndSelection*:GpuPageSelectorTest.*:GpuKernelAppend.*:GpuKernelLongRows.*:GpuKernelLargeBatch.*:GpuKernelErrors.*'
echo "MEMPIPE_REQUIRE_GPU=1 gpu_kernels_test --gtest_filter='$F'" > $OUT/gpu_kernels_test.log
MEMPIPE_REQUIRE_GPU=1 timeout 150 $B/gpu_kernels_test --gtest_brief=1 --gtest_filter="$F" >> $OUT/gpu_kernels_test.log 2>&1
echo "rc=$?" >> $OUT/gpu_kernels_test.log
tail -5 $OUT/gpu_kernels_test.log
for dd in native int8; do
  echo "mempipe-bench --layers=32 --context=32768 --batch=1 --steps=4 --placements=dense,gpu --digest_dtype=$dd" > $OUT/bench_32k_$dd.log
  timeout 40 $B/mempipe-bench --layers=32 --context=32768 --batch=1 --steps=4 --placements=dense,gpu \
    --digest_dtype=$dd --bandwidth_mib=0 --json=$OUT/bench_32k_$dd.json 2>&1 | grep -v '^\[' >> $OUT/bench_32k_$dd.log
  grep -E "^(dense|gpu) |recall|bytes read" $OUT/bench_32k_$dd.log
done
