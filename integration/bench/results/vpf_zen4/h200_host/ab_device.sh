#!/usr/bin/env bash
# Session script: kernel bench A/B on the H200 host, before (kb_old) and after (kb_new) the V
# prefetch moved into P.V; alternated; all logs in one tarball.
set -uo pipefail
[ -d .gpuwork/deps ] || tar -xJf .gpuwork/pack/bins.tar.xz -C .gpuwork || exit 1
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/usr/lib/x86_64-linux-gnu
W=/tmp/ab; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head --passes=7"
for r in 1 2 3; do for v in old new; do for th in 2 16; do
  for dt in bf16 fp32; do
    timeout 60 .gpuwork/kb_$v $S --dtype=$dt --threads=$th 2>&1 | grep -v '^\[' > $W/smol_${dt}_t${th}_${v}_$r.log
  done
  timeout 90 .gpuwork/kb_$v --kv_layout=head --threads=$th --passes=5 2>&1 | grep -v '^\[' > $W/smol_llama_t${th}_${v}_$r.log
  echo "r$r $v t$th at $((SECONDS-T0)) s" >> $W/runs.txt
  [ $((SECONDS-T0)) -gt 500 ] && break 3
done; done; done
tar -czf $OUT/ab.tgz -C /tmp ab; tail -3 $W/runs.txt
