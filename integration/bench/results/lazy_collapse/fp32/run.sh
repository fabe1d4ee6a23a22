#!/usr/bin/env bash
# fp32's first prefill at 2K and 4K: mempipe with the pages collapsed as blocks come into use
# (default) and with advise (no collapse), against CPU_ATTN; then the worker's timers at 4 x 4096.
set -uo pipefail
python integration/bench/vllm_cpu_bench.py --rows fp32:2048,fp32:4096 --batch 4 --new-tokens 32 \
  --variant advise:MEMPIPE_KV_HUGE_PAGES=advise --json "$1/fp32.json" > "$1/fp32.log" 2>&1
MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2,kv_layout=head python \
  integration/bench/vllm_cpu_profile.py --backend CUSTOM --dtype fp32 --length 4096 --batch 4 \
  --new-tokens 32 --json "$1/prof_fp32_4k.json" > "$1/prof_fp32_4k.log" 2>&1
