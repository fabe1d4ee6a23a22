#!/usr/bin/env bash
# RTL kernel CI step (issue 15): Yosys must accept the SystemVerilog (parse + elaborate, a small
# configuration: seconds), then the Verilator tests of fpga/rtl against the C++ reference
# (bit-exact scores and selections; fp32 units against the host). Reuses build-ci (the CPU
# suite's build) so only the verilated models and the two tests are compiled.
# MEMPIPE_RTL_CASES bounds the shape sweep of the kernel test (default 9 here; unset = all 27).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

srcs="fpga/rtl/mempipe_fp32.sv fpga/rtl/mempipe_fifo.sv fpga/rtl/mempipe_score_core.sv \
  fpga/rtl/mempipe_topk_select.sv fpga/rtl/mempipe_score_topk.sv"
if ! out=$(yosys -q -p "read_verilog -sv $srcs; \
    hierarchy -check -top mempipe_score_topk -chparam MAX_TOPK 16 -chparam MAX_PAGES 1024; proc" 2>&1); then
  echo "$out" >&2
  echo "[rtl] Yosys 0.23 rejects fpga/rtl" >&2
  exit 1
fi
echo "[rtl] Yosys accepts fpga/rtl"

cmake -S . -B build-ci -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on -DMEMPIPE_WERROR=ON \
  -DMEMPIPE_RTL=ON >/dev/null
cmake --build build-ci -j "$jobs" --target fpga_rtl_fp32_test fpga_rtl_score_topk_test fpga_rtl_cycles
MEMPIPE_RTL_CASES=${MEMPIPE_RTL_CASES:-9} ctest --test-dir build-ci -L rtl --output-on-failure -j "$jobs"
build-ci/tests/fpga/rtl/fpga_rtl_cycles --quick
