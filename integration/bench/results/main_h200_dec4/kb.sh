#!/usr/bin/env bash
# Session script: the host kernels at SmolLM2 4 x 6K on the H200 host, all logs in one tarball.
set -uo pipefail
[ -d .gpuwork/prebuilt ] || tar -xJf .gpuwork/pack/bins.tar.xz -C .gpuwork || exit 1
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/prebuilt
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head"
W=/tmp/kb2; rm -rf $W; mkdir -p $W; T0=$SECONDS
lscpu > $W/lscpu.txt; uptime > $W/uptime.txt
for r in 1 2 3; do for th in 16 2; do for dt in bf16 fp32; do
  timeout 60 $P/mempipe-cpu-kernel-bench $S --dtype=$dt --threads=$th --passes=7 2>&1 | grep -v '^\[' > $W/smol_${dt}_t${th}_$r.log
  echo "kb $dt t$th r$r rc=$? at $((SECONDS-T0)) s" >> $W/runs.txt
done; done
  MEMPIPE_POOL_SPIN_US=0 timeout 60 $P/mempipe-cpu-kernel-bench $S --dtype=bf16 --threads=16 --passes=7 2>&1 | grep -v '^\[' > $W/smol_bf16_t16_spin0_$r.log
  echo "kb bf16 t16 spin0 r$r rc=$? at $((SECONDS-T0)) s" >> $W/runs.txt
done
tar -czf $OUT/kb2.tgz -C /tmp kb2; cat $W/runs.txt
