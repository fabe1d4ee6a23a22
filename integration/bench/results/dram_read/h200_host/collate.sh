#!/usr/bin/env bash
# Collates run<N>/ logs of mempipe-cpu-kernel-bench: per shape and repetition, the read and the
# sparse and dense kernels' % of it (CPU time per thread, the kernels' reads alone in brackets),
# then the wall-clock %.  Usage: bash collate.sh run1
d=${1:-run1}
for n in $(ls $d/*_1.log | sed 's|.*/||; s|_1.log||'); do
  echo "== $n"
  for f in $d/${n}_*.log; do
    awk '/CPU time per thread;/{c=1; match($0,/: [0-9.]+ GB/); rd=substr($0,RSTART+2,RLENGTH-5)}
         /wall clock;/{c=2; match($0,/: [0-9.]+ GB/); rdw=substr($0,RSTART+2,RLENGTH-5)}
         /sparse attention \(sel|sparse attention, wall/{s[c]=$NF}
         /dense attention \(all|dense attention, wall/{d[c]=$NF}
         /sparse attention.s reads /{sr[c]=$NF} /dense attention.s reads /{dr[c]=$NF}
         END{printf "  cpu [read %6s: sparse %4s (reads %4s), dense %4s (reads %4s)]  wall [read %6s: sparse %4s, dense %4s]\n", rd, s[1], sr[1], d[1], dr[1], rdw, s[2], d[2]}' $f
  done
done
