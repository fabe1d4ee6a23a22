#!/usr/bin/env bash
# mkvar2.sh name chunk xh  (batch 128, T1 hints)
set -e
cd /work/wt/exp
sed -i "s/^#define MEMPIPE_EXP_CHUNK .*/#define MEMPIPE_EXP_CHUNK $2/" attention/decode.h
sed -i "s/^#define MEMPIPE_EXP_BATCH .*/#define MEMPIPE_EXP_BATCH 128/; s/^#define MEMPIPE_EXP_KH .*/#define MEMPIPE_EXP_KH _MM_HINT_T1/; s/^#define MEMPIPE_EXP_VH .*/#define MEMPIPE_EXP_VH _MM_HINT_T1/; s/^#define MEMPIPE_EXP_XH .*/#define MEMPIPE_EXP_XH $3/" attention/decode.cc
ninja -C build mempipe-cpu-kernel-bench > /tmp/mkvar2.log 2>&1 || { tail -20 /tmp/mkvar2.log; exit 1; }
cp build/integration/bench/mempipe-cpu-kernel-bench /work/main/.gpuwork/xeon/kb_$1
