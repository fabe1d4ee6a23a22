#!/usr/bin/env bash
# Per shape and variant: the three repetitions' read (GB/s, CPU time per thread), sparse and dense
# kernel time per layer (ms) and % of that run's read. Usage: collate.sh RUNDIR VARIANTS...
d=$1; shift
for shape in $(ls $d/*.log | sed 's|.*/||; s/_[a-z0-9-]*_[0-9]\.log$//' | sort -u); do
  echo "== $shape"
  for k in "$@"; do
    printf "%-12s" $k
    for f in $d/${shape}_${k}_*.log; do
      awk '/CPU time per thread/{c=1} /wall clock;/{c=0}
           /read bandwidth.*per-thread CPU time/{match($0,/[0-9.]+ GB\/s/); rd=substr($0,RSTART,RLENGTH-5)}
           c&&/sparse attention \(sel/{sp=$5; spp=$NF} c&&/dense attention \(all/{de=$5; dep=$NF}
           END{printf " [read %s: sparse %s %s, dense %s %s]", rd, sp, spp, de, dep}' $f
    done
    echo
  done
done
