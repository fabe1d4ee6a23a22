#!/usr/bin/env bash
# Build VM (2 vCPUs of an AMD EPYC family 26, Zen 5: AVX-512 with AVX512_BF16, 32 MiB L3), quiet:
# the decode kernels against the read from DRAM, 2 threads and 1, 3 repetitions, CPU time from
# each thread's own clock (ThreadsCpuMs). Run from the repository root after a Release build:
#   bash integration/bench/results/thread_clocks/vm_zen5/run.sh [out_dir]
set -euo pipefail
B=build/integration/bench
O=${1:-integration/bench/results/thread_clocks/vm_zen5}
mkdir -p "$O"
"$B"/mempipe-membw --mib=256,1024 --threads=1,2 > "$O"/membw.txt 2>/dev/null
k() { local n=$1; shift
  echo "[run] $n" >&2
  "$B"/mempipe-cpu-kernel-bench --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > "$O/$n.log"; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --budget=512 --seqs=4"
for r in 1 2 3; do
  k smol4x6k_bf16_t2_$r $S --context=6144 --dtype=bf16 --threads=2
  k smol4x6k_fp32_t2_$r $S --context=6144 --dtype=fp32 --threads=2
  k smol4x8k_bf16_t2_$r $S --context=8192 --dtype=bf16 --threads=2
  k llama1x32k_bf16_t2_$r --threads=2
  k llama1x32k_fp32_t2_$r --dtype=fp32 --threads=2
  k smol4x6k_bf16_t1_$r $S --context=6144 --dtype=bf16 --threads=1
  k llama1x32k_bf16_t1_$r --threads=1
done
