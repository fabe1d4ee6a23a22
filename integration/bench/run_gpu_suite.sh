#!/usr/bin/env bash
# mempipe GPU suite for a CUDA machine: build (unless a build is given), run every GPU kernel
# test against the CPU reference, then the benchmark beside PyTorch (gpu_suite.py).
#
#   integration/bench/run_gpu_suite.sh [build_dir] [out_dir]
#   MEMPIPE_GPU_LIBS=dir  extra shared libraries (Abseil, cudart) for a build made elsewhere
#   MEMPIPE_BENCH_ARGS    extra gpu_suite.py arguments, e.g. "--contexts 32768 --batches 1"
set -uo pipefail
BUILD=${1:-build-gpu}
OUT=${2:-gpu-results}
mkdir -p "$OUT"
if [ -n "${MEMPIPE_GPU_LIBS:-}" ]; then
  export LD_LIBRARY_PATH="$MEMPIPE_GPU_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ ! -x "$BUILD/tests/gpu/gpu_kernels_test" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DMEMPIPE_GPU=cuda -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DMEMPIPE_XRT=off || exit 1
  ninja -C "$BUILD" gpu_kernels_test mempipe_gpu_capi || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"

echo "== correctness: gpu_kernels_test"
"$BUILD/tests/gpu/gpu_kernels_test" --gtest_brief=1 2>&1 | tee "$OUT/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu_kernels_test exit code $test_rc"

echo "== benchmark"
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 python3 integration/bench/gpu_suite.py \
  --lib "$BUILD/integration/bench/libmempipe_gpu_capi.so" --out "$OUT/gpu_bench.json" \
  ${MEMPIPE_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc bench rc=$bench_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
