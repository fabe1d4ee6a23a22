#!/usr/bin/env bash
# One line per log: shape and repetition, each kernel's % of the reads around it in the
# wall-clock table (median, range over the passes), and the reads' median GB/s: collate.sh DIR
for f in "$1"/*_[0-9].log; do
  awk -v n="$(basename "$f" .log)" '
    /wall clock; then/ {split($0, a, "the reads: median "); split(a[2], b, " "); rd = b[1]; wall = 1}
    wall && /sparse attention, wall/ {sp = $10 " " $11}
    wall && /dense attention, wall/ {de = $10 " " $11}
    wall && /sparse attention.s reads, wall/ {spr = $11 " " $12}
    wall && /dense attention.s reads, wall/ {der = $11 " " $12}
    END {printf "%-18s sparse %-12s dense %-12s | reads: sparse %-12s dense %-12s | read %s GB/s\n", n, sp, de, spr, der, rd}' "$f"
done
