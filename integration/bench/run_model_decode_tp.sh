#!/usr/bin/env bash
# The tensor-parallel whole-model decode runner on a machine with (at least) two CUDA GPUs
# (issue 12): builds the mempipe module with the GPU kernels (run_gpu_suite.sh's build stage;
# MEMPIPE_PREBUILT / MEMPIPE_ABSL_LIBDIR as there), then
#   1. model_decode_tp.py --tp 2 for Llama-3-8B at 512K and 1M tokens, batches 1, 2 and max,
#      JSON rewritten after every configuration (a run cut short keeps what it finished);
#   2. a GPU check of the split: --tp 1 and --tp 2 at 32K x 1 (dense-paged and gpu placements)
#      with --dump, compared by tp_check.py (the logits of the split model against the
#      unsplit one on one GPU; a dropped all-reduce is run too and must be rejected).
#
#   integration/bench/run_model_decode_tp.sh [out_dir]
#   MEMPIPE_TP_ARGS    extra arguments of run 1 (e.g. --contexts 1048576 --batches 1)
#   MEMPIPE_TP_CHECK=0 skip run 2
set -uo pipefail
OUT=${1:-model-decode-tp-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,pci.bus_id \
  --format=csv | tee "$OUT/device.txt"
nvidia-smi topo -m 2>/dev/null | head -4 | tee -a "$OUT/device.txt"
BUILD_LOG=/tmp/run_model_decode_tp_build.log
MEMPIPE_STAGES=build bash integration/bench/run_gpu_suite.sh /tmp/tp-build > "$BUILD_LOG" 2>&1 \
  || { tail -40 "$BUILD_LOG"; exit 1; }
tail -2 "$BUILD_LOG"
export PYTHONPATH="${MEMPIPE_SITE:-/tmp/mempipe-site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
# shellcheck disable=SC2086
python3 -W ignore::UserWarning integration/bench/model_decode_tp.py --tp 2 \
  --batches 1,2,max --json "$OUT/model_decode_tp2_h200.json" \
  --md "$OUT/model_decode_tp2_h200.md" ${MEMPIPE_TP_ARGS:-} 2>&1 \
  | tee "$OUT/model_decode_tp2_h200.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
if [ "${MEMPIPE_TP_CHECK:-1}" != 0 ]; then
  # shellcheck disable=SC2054  # the commas are inside flag values
  check=(--contexts 32768 --batches 1 --placements dense-paged,gpu --steps 3 --min_window_s 0)
  for run in "tp1 --tp 1" "tp2 --tp 2" "tp2_no_allreduce --tp 2 --fault no_allreduce"; do
    read -r name flags <<< "$run"
    # shellcheck disable=SC2086
    python3 integration/bench/model_decode_tp.py $flags "${check[@]}" \
      --dump "/tmp/$name.pt" > "/tmp/$name.log" 2>&1 || { tail -20 "/tmp/$name.log"; rc=1; }
  done
  python3 integration/bench/tp_check.py /tmp/tp1.pt /tmp/tp2.pt /tmp/tp2_no_allreduce.pt \
    2>&1 | tee "$OUT/tp_check.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
echo "run_model_decode_tp: rc=$rc"
exit $rc
