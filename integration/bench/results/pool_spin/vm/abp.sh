#!/usr/bin/env bash
# abp.sh reps threads "args" bin...: prints per run: bin, sparse, dense, sparse reads, dense reads (ms), read GB/s
reps=$1; t=$2; A=$3; shift 3
for r in $(seq $reps); do for b in "$@"; do
  out=$($b --threads=$t $A 2>&1)
  echo "$(basename $b) $(echo "$out" | awk '/attention/ {for(i=1;i<=NF;i++) if($i=="ms") printf "%s ", $(i-1)}') read $(echo "$out" | grep -o 'CPU time: [0-9.]*' | awk '{print $3}')"
done; done
