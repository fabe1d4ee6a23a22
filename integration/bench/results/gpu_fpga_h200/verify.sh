#!/usr/bin/env bash
# Final verification of main on the H200 (lead's session script; copied into the results).
set -o pipefail
for f in .gpuwork/final/pack/*.tar.xz; do tar -xJf "$f" -C .gpuwork/final; done
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/final/prebuilt
export CMAKE_PREFIX_PATH=$D LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:$P/libs CPATH=$D/include \
       PYTHONUNBUFFERED=1 MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
echo "main at $(cat .gpuwork/final/REV)" | tee -a $OUT/device.txt
T0=$SECONDS
for t in gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test; do
  echo "== $t (MEMPIPE_REQUIRE_GPU=1)"
  MEMPIPE_REQUIRE_GPU=1 timeout 240 $PWD/.gpuwork/final/tests/$t --gtest_brief=1 > /tmp/$t.log 2>&1; r=$?
  grep -E "FAILED|PASSED|SKIPPED|tests ran" /tmp/$t.log | tail -6; echo "$t rc=$r"
done 2>&1 | tee $OUT/cxx_tests.log
echo "[t] cxx $((SECONDS-T0)) s" | tee -a $OUT/cxx_tests.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build tests" MEMPIPE_SITE=/tmp/mempipe-site \
MEMPIPE_TESTS="tests/python --ignore=tests/python/test_vllm_conformance.py --ignore=tests/python/test_vllm_generate.py --ignore=tests/python/test_vllm_schemes.py --ignore=tests/python/test_design_space.py --ignore=tests/python/test_quality_smollm.py --ignore=tests/python/test_model_decode_tp.py" \
  timeout 330 bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$?" >> /tmp/suite.log
{ grep -E "passed|failed|error|FAILED|ERROR" /tmp/suite.log | tail -30; tail -3 /tmp/suite.log; echo "[t] suite $((SECONDS-T0)) s"; } > $OUT/pytest_tail.log
cp /tmp/o/gpu_pytest.log $OUT/ 2>/dev/null
