#!/usr/bin/env bash
# One line per kernel-bench log: sparse and dense attention, % of the read, CPU time / wall.
# Usage: bash collate.sh DIR
for f in "$1"/*.log; do
  case $f in *mb.log) continue ;; esac
  awk -v n="$(basename "$f" .log)" '
    /^  sparse attention \(selected/{sc=$NF} /^  dense attention \(all/{dc=$NF}
    /^  sparse attention, wall/{sw=$NF} /^  dense attention, wall/{dw=$NF}
    /^  sparse attention.s reads  /{sr=$NF} /^  dense attention.s reads  /{dr=$NF}
    END{printf "%-24s sparse %4s / %4s  dense %4s / %4s  (bare reads, CPU: sparse %s, dense %s)\n", n, sc, sw, dc, dw, sr, dr}' "$f"
done
