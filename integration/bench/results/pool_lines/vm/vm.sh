#!/usr/bin/env bash
# The 2-vCPU build VM: SmolLM2 4 x 6K (page_kt) in bf16 and fp32, at 1 thread on v1 (no pool
# call) and at 2 threads on base and v1 alternated (README.md, "Build VM"):
#   SNAP=.gpuwork/snap bash integration/bench/results/pool_lines/vm/vm.sh OUT_DIR [ROUNDS]
set -uo pipefail
O=${1:?output directory}; K=${SNAP:-.gpuwork/snap}; mkdir -p "$O"
export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
lscpu > "$O/lscpu.txt"
SMOL="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --seqs=4 --budget=512 --dtype=bf16 --passes=5 --kv_layout=page_kt"
for r in $(seq 1 "${2:-3}"); do
  for dt in bf16 fp32; do
    S=${SMOL/bf16/$dt}; n=smol; [ "$dt" = fp32 ] && n=smol32
    { uptime; "$K/kb_v1" $S --threads=1; } > "$O/${n}_v1_t1_$r.log" 2>&1
    for b in base v1; do { uptime; "$K/kb_$b" $S --threads=2; } > "$O/${n}_${b}_t2_$r.log" 2>&1; done
    echo "round $r $dt done" >&2
  done
done
