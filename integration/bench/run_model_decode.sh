#!/usr/bin/env bash
# The whole-model decode runner on a CUDA machine (issue 12): builds the mempipe module with the
# GPU kernels (run_gpu_suite.sh's build stage; MEMPIPE_PREBUILT / MEMPIPE_ABSL_LIBDIR as there),
# then runs model_decode.py for Llama-3-8B (contexts 32K/128K/512K, batches 1, 8, max) and the
# Llama-3-70B slice (32K and 128K, batches 1 and max), writing JSON, Markdown and logs to out_dir.
#
#   integration/bench/run_model_decode.sh [out_dir]
#   MEMPIPE_DECODE_ARGS   extra arguments of the Llama-3-8B run
#   MEMPIPE_SLICE=0       skip the 70B-slice run
set -uo pipefail
OUT=${1:-model-decode-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MEMPIPE_STAGES=build bash integration/bench/run_gpu_suite.sh "$OUT" > /tmp/run_model_decode_build.log 2>&1 \
  || { tail -40 /tmp/run_model_decode_build.log; exit 1; }
tail -3 /tmp/run_model_decode_build.log
export PYTHONPATH="${MEMPIPE_SITE:-/tmp/mempipe-site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
# shellcheck disable=SC2086
python3 integration/bench/model_decode.py --json "$OUT/model_decode_h200.json" \
  --md "$OUT/model_decode_h200.md" ${MEMPIPE_DECODE_ARGS:-} 2>&1 | tee "$OUT/model_decode_h200.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
if [ "${MEMPIPE_SLICE:-1}" != 0 ]; then
  python3 integration/bench/model_decode.py --model llama3-70b-slice --contexts 32768,131072 \
    --batches 1,max --json "$OUT/model_decode_70b_slice_h200.json" \
    --md "$OUT/model_decode_70b_slice_h200.md" 2>&1 | tee "$OUT/model_decode_70b_slice_h200.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
echo "run_model_decode: rc=$rc"
exit $rc
