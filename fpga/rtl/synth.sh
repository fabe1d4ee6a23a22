#!/usr/bin/env bash
# Synthesizes mempipe_score_topk for AMD UltraScale+ (the U55C's xcu55c family, xcup) with Yosys
# 0.23 and reports resources and logic depth. Hierarchical: each distinct module is synthesized
# once (a flattened run of one CU does not finish in an hour on a shared 2-core machine), and
# `stat -top` composes the totals over the instance tree. Logic levels come from `ltp -noff` on
# each leaf module flattened on its own, with the flip-flops (FD*) left out of the graph so each
# path is one pipeline stage, register to register (fpga/rtl/synth.md).
# Usage: fpga/rtl/synth.sh OUT_DIR [MAX_TOPK] [MAX_PAGES]
#   OUT_DIR/stat_<topk>_<pages>.txt   cell counts per module and for the whole CU
#   OUT_DIR/ltp_<module>.txt          longest path (levels) of each leaf
set -euo pipefail
out=${1:?usage: synth.sh OUT_DIR [MAX_TOPK] [MAX_PAGES]}
topk=${2:-1024}
pages=${3:-65536}
here=$(cd "$(dirname "$0")" && pwd)
srcs="$here/mempipe_fp32.sv $here/mempipe_fifo.sv $here/mempipe_score_core.sv \
      $here/mempipe_topk_select.sv $here/mempipe_score_topk.sv"
mkdir -p "$out"
echo "[synth] mempipe_score_topk MAX_TOPK=$topk MAX_PAGES=$pages (hierarchical)"
yosys -l "$out/synth_${topk}_${pages}.log" -q -p "
  read_verilog -sv $srcs
  hierarchy -check -top mempipe_score_topk -chparam MAX_TOPK $topk -chparam MAX_PAGES $pages
  synth_xilinx -family xcup -top mempipe_score_topk
  tee -o $out/stat_${topk}_${pages}.txt stat -top mempipe_score_topk
" >/dev/null
if [ "${MEMPIPE_SYNTH_LTP:-1}" = 1 ]; then
  for m in mempipe_fp32_mul mempipe_fp32_add mempipe_fp32_gt mempipe_half_to_fp32; do
    echo "[synth] logic levels of $m (longest register-to-register stage)"
    yosys -q -p "
      read_verilog -sv $here/mempipe_fp32.sv
      synth_xilinx -family xcup -top $m -flatten
      tee -o $out/ltp_$m.txt ltp -noff t:FD* %n
      tee -o $out/leaf_stat_$m.txt stat
    " >/dev/null
  done
  # The accumulator loop of the score core (LUTRAM of running sums + pipelined adder); the
  # LUTRAMs are left out of the graph too (their write port is a register).
  echo "[synth] logic levels of the accumulator loop (probes/synth_acc_lane.sv)"
  yosys -q -p "
    read_verilog -sv $here/mempipe_fp32.sv $here/probes/synth_acc_lane.sv
    synth_xilinx -family xcup -top synth_acc_lane -flatten
    tee -o $out/ltp_synth_acc_lane.txt ltp -noff t:FD* t:RAM* %u %n
    tee -o $out/leaf_stat_synth_acc_lane.txt stat
  " >/dev/null
fi
echo "[synth] done: $out"
