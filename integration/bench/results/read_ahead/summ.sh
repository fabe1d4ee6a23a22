#!/usr/bin/env bash
# One line per log: the sparse kernel's wall time and % of the read, its bare reads, from cache.
#   bash summ.sh LOGDIR [PATTERN]
for f in $(ls "$1"/${2:-*}.log); do
  printf "%-34s %s\n" "$(basename $f .log)" "$(grep -E "^  sparse attention(, wall|'s reads, wall| from cache, wall)" $f | awk '{printf "%s ms %s | ", $(NF-7), $(NF-1)}')"
done
