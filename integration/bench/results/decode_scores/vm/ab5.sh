#!/usr/bin/env bash
# usage: ab5.sh out reps bin1 bin2 ...
out=$1; reps=$2; shift 2
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --layers=64"
: > $out
for i in $(seq $reps); do for b in "$@"; do
  echo "== $b llama" >> $out; $b --threads=1 --passes=3 --kv_layout=head 2>&1 | grep -E 'attention \(' >> $out
  echo "== $b smol_fp32" >> $out; $b --threads=1 --passes=5 --kv_layout=head $S --dtype=fp32 2>&1 | grep -E 'attention \(' >> $out
  echo "== $b smol_bf16" >> $out; $b --threads=1 --passes=5 --kv_layout=head $S --dtype=bf16 2>&1 | grep -E 'attention \(' >> $out
done; done
