#!/usr/bin/env bash
# The fpga rows of the whole-model decode runner on a CUDA machine (issue 11), one command:
# builds the mempipe module with the GPU kernels (run_gpu_suite.sh's build stage, as
# run_model_decode.sh), runs the schemes' Python tests with skips as failures (placement=fpga
# on CUDA tensors: bit-identical to gpu under every scheme, fallbacks on a tiny deadline, the
# transformers adapter), then model_decode.py for Llama-3-8B at 32K and 128K, batch 1 and 8:
# dense-sdpa, gpu and the fpga rows (sync, pipelined4, reuse4 async, lookahead: the projected
# query) side by side. The look-ahead with layer L's own query as well, for comparison:
#   MEMPIPE_DECODE_ARGS="--fpga_schemes sync,pipelined4,reuse4,lookahead,lookahead_same"
#
#   integration/bench/run_model_decode_fpga.sh [out_dir]
#   MEMPIPE_DECODE_ARGS   extra arguments of model_decode.py (e.g. --deadline_ms 500)
#   MEMPIPE_SKIP_BUILD=1  reuse the module already installed in MEMPIPE_SITE
set -uo pipefail
OUT=${1:-model-decode-fpga-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "${MEMPIPE_SKIP_BUILD:-0}" != 1 ]; then
  MEMPIPE_STAGES=build bash integration/bench/run_gpu_suite.sh "$OUT" \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  tail -3 "$OUT/build.log"
fi
export PYTHONPATH="${MEMPIPE_SITE:-/tmp/mempipe-site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
MEMPIPE_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider -ra tests/python/test_schemes.py \
  tests/python/test_lookahead.py \
  2>&1 | tee "$OUT/test_schemes_h200.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
# shellcheck disable=SC2086
python3 integration/bench/model_decode.py --contexts 32768,131072 --batches 1,8 \
  --placements dense-sdpa,gpu,fpga --json "$OUT/model_decode_fpga_h200.json" \
  --md "$OUT/model_decode_fpga_h200.md" ${MEMPIPE_DECODE_ARGS:-} 2>&1 \
  | tee "$OUT/model_decode_fpga_h200.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
echo "run_model_decode_fpga: rc=$rc"
exit $rc
