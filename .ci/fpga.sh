#!/usr/bin/env bash
# FPGA path CI step (issue 4). The regular CTest suites already run the FPGA tests, the XRT ones
# included (they set up XRT's noop shim per process). This step adds what those builds do not:
#   1. XRT required: configure with -DMEMPIPE_XRT=on so a missing XRT fails loudly instead of
#      silently dropping the XRT tests (auto would);
#   2. the committed v++ connectivity file is what its generator prints;
#   3. the FPGA tests of that build.
# Runs after .ci/setup on a fresh Debian 12 machine; a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

diff -u fpga/hls/u55c_connectivity.cfg <(bash fpga/hls/make_connectivity.sh 32) \
  || { echo "fpga/hls/u55c_connectivity.cfg is stale: run fpga/hls/make_connectivity.sh 32" >&2; exit 1; }

cmake -S . -B build-ci-fpga -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on -DMEMPIPE_WERROR=ON >/dev/null
cmake --build build-ci-fpga -j "$jobs" --target fpga_kernel_csim_test fpga_u55c_model_test \
  fpga_emulated_u55c_test fpga_xrt_noop_test fpga_xrt_noop_delay_test
ctest --test-dir build-ci-fpga --output-on-failure -j "$jobs" -R '^(ScoreTopkKernel|DigestUpdateKernel|SplitUpdateLaunches|U55cModel|EmulatedU55c|FpgaFactory|XclbinWriter|XrtSelector|XrtSelectorDelay)\.'
