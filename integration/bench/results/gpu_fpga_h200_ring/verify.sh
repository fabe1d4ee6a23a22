#!/usr/bin/env bash
# H200 verification, call 1: C++ GPU tests (skips fail), the module, the Python suite on CUDA.
source .gpuwork/final/common.sh
for t in gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test; do
  echo "== $t (MEMPIPE_REQUIRE_GPU=1)"
  MEMPIPE_REQUIRE_GPU=1 timeout 200 $PWD/.gpuwork/final/tests/$t --gtest_brief=1 > $OUT/r/$t.log 2>&1; r=$?
  grep -E "FAILED|PASSED|SKIPPED|tests ran" $OUT/r/$t.log | tail -6; echo "$t rc=$r"
done 2>&1 | tee $OUT/cxx_tests.log
echo "[t] cxx $((SECONDS-T0)) s" | tee -a $OUT/cxx_tests.log
build_module | tee -a $OUT/cxx_tests.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="tests" MEMPIPE_SITE=$SITE \
MEMPIPE_TESTS="tests/python --ignore=tests/python/test_vllm_conformance.py --ignore=tests/python/test_vllm_generate.py --ignore=tests/python/test_vllm_schemes.py --ignore=tests/python/test_design_space.py --ignore=tests/python/test_quality_smollm.py --ignore=tests/python/test_model_decode_tp.py" \
  timeout $((560 - (SECONDS-T0))) bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$?" >> /tmp/suite.log
{ grep -E "passed|failed|error|FAILED|ERROR" /tmp/suite.log | tail -30; tail -3 /tmp/suite.log; echo "[t] suite $((SECONDS-T0)) s"; } > $OUT/pytest_tail.log
cp /tmp/o/gpu_pytest.log $OUT/r/ 2>/dev/null; cp /tmp/suite.log $OUT/r/
finish
