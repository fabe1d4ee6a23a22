#!/usr/bin/env bash
# CI step for the GPU kernels (no GPU on CI): builds the one HIP-dialect source for NVIDIA
# (nvcc, sm_90) and compiles it for AMD (Debian hipcc, gfx90a + gfx940), then runs the GPU test
# binary, whose tests skip without a device. Only GPU targets are built. The default CUDA build
# also targets sm_80; CI leaves it out: the kernels have no per-architecture paths, and nvcc
# spent 346 CPU-seconds on them for the two on the 2-core build VM (2026-12-02).
#   .ci/gpu.sh            (after .ci/setup; uses build-ci-cuda/ and build-ci-hip/)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${MEMPIPE_JOBS:-2}

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  echo "[gpu] CUDA build (sm_90)"
  cmake -S . -B build-ci-cuda -G Ninja -DMEMPIPE_GPU=cuda -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DMEMPIPE_XRT=off -DMEMPIPE_WERROR=ON >/dev/null
  ninja -C build-ci-cuda -j"$JOBS" gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test
  echo "[gpu] GPU tests (they skip without a GPU)"
  build-ci-cuda/tests/gpu/gpu_kernels_test --gtest_brief=1
  build-ci-cuda/tests/gpu/gpu_apply_device_test --gtest_brief=1
  build-ci-cuda/tests/gpu/gpu_selection_offload_test --gtest_brief=1
else
  echo "[gpu] nvcc not found: CUDA build SKIPPED (install the CUDA toolkit to check it)"
fi

echo "[gpu] HIP compile (gfx90a, gfx940)"
cmake -S . -B build-ci-hip -G Ninja -DMEMPIPE_GPU=hip -DMEMPIPE_XRT=off -DMEMPIPE_BUILD_TESTS=OFF \
  >/dev/null
# Without an AMD GPU, hipcc may print a harmless rocm_agent_enumerator traceback.
ninja -C build-ci-hip -j"$JOBS" mempipe_gpu_runtime mempipe_attention_gpu mempipe_retriever_gpu \
  mempipe_gpu_selector mempipe_gpu_apply mempipe_gpu_offload_kernels mempipe_gpu_offload
echo "[gpu] OK"
