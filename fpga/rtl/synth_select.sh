#!/usr/bin/env bash
# Resources of the top-k select alone at two insertion-array sizes, for the per-entry slope
# that extrapolates a CU to MAX_TOPK = 1024 (fpga/rtl/synth.md). Yosys 0.23, UltraScale+.
# Usage: fpga/rtl/synth_select.sh OUT_DIR [TOPK_A] [TOPK_B]
set -euo pipefail
out=${1:?usage: synth_select.sh OUT_DIR [TOPK_A] [TOPK_B]}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
for topk in "${2:-16}" "${3:-64}"; do
  echo "[synth] mempipe_topk_select MAX_TOPK=$topk MAX_PAGES=65536"
  yosys -q -l "$out/select_$topk.log" -p "
    read_verilog -sv $here/mempipe_fp32.sv $here/mempipe_fifo.sv $here/mempipe_topk_select.sv
    hierarchy -check -top mempipe_topk_select -chparam MAX_TOPK $topk -chparam MAX_PAGES 65536
    synth_xilinx -family xcup -top mempipe_topk_select -flatten -noiopad
    tee -o $out/select_stat_$topk.txt stat
    tee -o $out/select_ltp_$topk.txt ltp -noff
  " >/dev/null
done
