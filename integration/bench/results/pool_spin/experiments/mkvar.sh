#!/usr/bin/env bash
# mkvar.sh name batch khint vhint xh
set -e
cd /work/wt/exp
f=attention/decode.cc
sed -i "s/^#define MEMPIPE_EXP_BATCH .*/#define MEMPIPE_EXP_BATCH $2/; s/^#define MEMPIPE_EXP_KH .*/#define MEMPIPE_EXP_KH $3/; s/^#define MEMPIPE_EXP_VH .*/#define MEMPIPE_EXP_VH $4/; s/^#define MEMPIPE_EXP_XH .*/#define MEMPIPE_EXP_XH ${5:-0}/" $f
ninja -C build mempipe-cpu-kernel-bench > /dev/null
cp build/integration/bench/mempipe-cpu-kernel-bench /work/tmp/ev_$1
