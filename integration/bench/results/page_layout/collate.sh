#!/usr/bin/env bash
# One line per run of run.sh: sparse kernel (CPU time per thread) % of the read, its bare reads'
# %, sparse wall ms and %, dense wall ms and %.   collate.sh [folder, default: this one]
D=${1:-$(dirname "$0")}
for f in "$D"/smol_bf16/*.log "$D"/smol_fp32/*.log "$D"/llama_bf16/*.log; do
  printf '%-22s sparse %4s  reads %4s  wall %s %4s  dense wall %s %4s\n' "$(basename "$f" .log)" \
    "$(grep -E '^  sparse attention \(' "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E "^  sparse attention's reads  " "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E '^  sparse attention, wall' "$f" | awk '{print $4}')" \
    "$(grep -E '^  sparse attention, wall' "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E '^  dense attention, wall' "$f" | awk '{print $4}')" \
    "$(grep -E '^  dense attention, wall' "$f" | awk '{print $(NF-1)}')"
done
