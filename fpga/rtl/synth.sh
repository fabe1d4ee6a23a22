#!/usr/bin/env bash
# Synthesizes mempipe_score_topk for AMD UltraScale+ (the U55C's xcu55c) with Yosys and writes
# the cell counts and the longest path in logic levels.
# Usage: fpga/rtl/synth.sh OUT_DIR [MAX_TOPK] [MAX_PAGES]
#   OUT_DIR/synth_<topk>_<pages>.log   full Yosys log (stat = resources, ltp = logic levels)
# Yosys 0.23 (Debian 12); one CU; slow on 2 cores (a MAX_TOPK=1024 run takes long: the insertion
# array is ~1,000 48-bit comparators).
set -euo pipefail
out=${1:?usage: synth.sh OUT_DIR [MAX_TOPK] [MAX_PAGES]}
topk=${2:-1024}
pages=${3:-65536}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
log="$out/synth_${topk}_${pages}.log"
yosys -l "$log" -q -p "
  read_verilog -sv $here/mempipe_fp32.sv $here/mempipe_fifo.sv $here/mempipe_score_core.sv \
                   $here/mempipe_topk_select.sv $here/mempipe_score_topk.sv
  hierarchy -check -top mempipe_score_topk -chparam MAX_TOPK $topk -chparam MAX_PAGES $pages
  synth_xilinx -family xcup -top mempipe_score_topk -flatten
  tee -o $out/stat_${topk}_${pages}.txt stat
  tee -o $out/ltp_${topk}_${pages}.txt ltp -noff
" >/dev/null
echo "[synth] MAX_TOPK=$topk MAX_PAGES=$pages: $out/stat_${topk}_${pages}.txt, $out/ltp_${topk}_${pages}.txt"
