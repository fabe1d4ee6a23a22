#!/usr/bin/env bash
# One line per log of run.sh: sparse wall ms and % of the read, its bare reads' %, dense wall ms
# and %, CPU-time sparse %.   collate.sh FOLDER
D=${1:?folder}
for f in "$D"/*.log; do
  printf '%-22s sparse wall %s %4s  reads %4s  dense wall %s %4s  sparse cpu %4s\n' \
    "$(basename "$f" .log)" \
    "$(grep -E '^  sparse attention, wall' "$f" | awk '{print $4}')" \
    "$(grep -E '^  sparse attention, wall' "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E "^  sparse attention's reads, wall" "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E '^  dense attention, wall' "$f" | awk '{print $4}')" \
    "$(grep -E '^  dense attention, wall' "$f" | awk '{print $(NF-1)}')" \
    "$(grep -E '^  sparse attention \(' "$f" | awk '{print $(NF-1)}')"
done
