#!/usr/bin/env bash
# One GPU-machine verification of this tree (issue 10's closing run): the C++ GPU tests, the
# Python front door (run_gpu_suite.sh: pytest with skips as failures, the transformers
# Llama-3-8B check with eager vs sdpa), and mempipe-bench --placements=dense,gpu at the
# Llama-3-8B attention shape with step 4 on the GPU (backend/gpu/gpu_apply_device.h), and
# --placement=gpu through the stage pipeline.
#
#   integration/bench/run_gpu_verify.sh PREBUILT OUT
#   PREBUILT: gpu_kernels_test, gpu_apply_device_test, gpu_selection_offload_test,
#             mempipe-bench and the static libraries run_gpu_suite.sh links the module from
#             (MEMPIPE_PREBUILT), built elsewhere with -DMEMPIPE_GPU=cuda
#             -DCMAKE_CUDA_ARCHITECTURES=90 (results/main_h200_dec3/README.md: what else the
#             GPU machine needs carried: Abseil's libraries, Abseil/Boost/DLPack headers, XRT's)
#   MEMPIPE_TESTS     pytest selection (run_gpu_suite.sh's default unless set)
#   MEMPIPE_VERIFY_BENCH  "context:batch:layers ..." runs of mempipe-bench (default below)
set -uo pipefail
PRE=$(cd "$1" && pwd)
OUT=$2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rc=0
t0=$SECONDS
echo "== C++ GPU tests (MEMPIPE_REQUIRE_GPU=1)"
for t in gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test; do
  MEMPIPE_REQUIRE_GPU=1 "$PRE/$t" --gtest_brief=1 2>&1 | tail -n 40 | tee "$OUT/$t.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
echo "C++ tests: $((SECONDS - t0)) s"
MEMPIPE_PREBUILT=$PRE MEMPIPE_STAGES="build tests hf" \
  MEMPIPE_SITE=${MEMPIPE_SITE:-/tmp/mempipe-site} \
  bash integration/bench/run_gpu_suite.sh "$OUT" || rc=1
echo "suite: $((SECONDS - t0)) s"
echo "== mempipe-bench --placements=dense,gpu (Llama-3-8B attention shape, bf16)"
for run in ${MEMPIPE_VERIFY_BENCH:-32768:1:32 32768:8:32 131072:1:32 131072:8:8}; do
  IFS=: read -r ctx batch layers <<<"$run"
  name="mempipe_bench_${ctx}_b${batch}_l${layers}"
  echo "-- context $ctx batch $batch layers $layers"
  "$PRE/mempipe-bench" --layers="$layers" --context="$ctx" --batch="$batch" --steps=4 \
    --placements=dense,gpu --placement=gpu --json="$OUT/$name.json" 2>&1 | grep -v "^\[" | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  echo "elapsed $((SECONDS - t0)) s"
done
echo "run_gpu_verify: rc=$rc"
exit $rc
