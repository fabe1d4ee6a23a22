#!/bin/bash
# usage: vmab.sh OUTDIR REPS arm... (arm = a mempipe-cpu-kernel-bench binary in this directory, or NAME:ENV=VAL)
O=$1; R=$2; shift 2; mkdir -p $O
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head --threads=2"
L="--kv_layout=head --dtype=bf16 --threads=2"
for r in $(seq 1 $R); do
  for a in "$@"; do
    b=${a%%:*}; e=""; [[ $a == *:* ]] && e=${a#*:}; n=${a//[:=]/_}
    for sh in smol4_bf16 smol4_fp32 llama1; do
      case $sh in smol4_bf16) f="$S --dtype=bf16";; smol4_fp32) f="$S --dtype=fp32";; llama1) f="$L";; esac
      uptime > $O/${sh}_${n}_$r.log; env $e ./$b $f >> $O/${sh}_${n}_$r.log 2>/dev/null
    done
  done
done
