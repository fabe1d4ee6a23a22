#!/bin/bash
# The build VM (2 vCPUs of an AMD EPYC, Zen 1: AVX2, no AVX-512), 2 threads, head-major cache.
# usage: ab.sh OUTDIR REPS ARM...   ARM = NAME=BINARY[:--cpu_kernel=K]; arms alternate in each
# repetition, the three shapes in turn. Logs: OUTDIR/<shape>_<rep>_<arm>.log, each starting
# with `uptime` (the load the run met).
O=$1; R=$2; shift 2; mkdir -p "$O"
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head --threads=2"
L="--kv_layout=head --dtype=bf16 --threads=2"
for r in $(seq 1 "$R"); do
  for a in "$@"; do
    n=${a%%=*}; rest=${a#*=}; b=${rest%%:*}; k=""; [[ $rest == *:* ]] && k=${rest#*:}
    for sh in smol4_bf16 smol4_fp32 llama1_bf16; do
      case $sh in smol4_bf16) f="$S --dtype=bf16";; smol4_fp32) f="$S --dtype=fp32";; llama1_bf16) f="$L";; esac
      uptime > "$O/${sh}_${r}_$n.log"; $b $f $k >> "$O/${sh}_${r}_$n.log" 2>/dev/null
      echo "[ab] rep $r arm $n $sh done $(date +%T)"
    done
  done
done
