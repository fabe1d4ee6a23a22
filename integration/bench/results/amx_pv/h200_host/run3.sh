#!/usr/bin/env bash
# H200 host, CPU only: run 2's comparison (run2.sh: FMA P.V, AMX P.V, P.V skipped) with the
# in-place AMX variant built into kb (experiments/amx_pv_in_place_495ae3c.diff plus the SKIP
# switch), after the whole decode test binary (dt) of that build.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
timeout 200 $X/dt --gtest_brief=1 > $OUT/r/decode_test.txt 2>&1; echo "decode_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
bash "$(dirname "$0")/run2.sh"
