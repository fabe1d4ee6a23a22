#!/usr/bin/env bash
# Offload helper's H200 run (not part of the repo).
set -o pipefail
D=$PWD/.gpuwork/deps/usr; G=$PWD/.gpuwork/offload; P=$G/prebuilt
export CMAKE_PREFIX_PATH=$D LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:$P/libs CPATH=$D/include \
       PYTHONUNBUFFERED=1 MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu MEMPIPE_REQUIRE_GPU=1
cd $G
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
echo "offload at $(cat REV)" | tee -a $OUT/device.txt
t0=$SECONDS
timeout 120 $P/gpu_selection_offload_test 2>&1 | tee $OUT/gpu_selection_offload_test.log
echo "gpu_selection_offload_test rc=$? ($((SECONDS-t0)) s)" | tee -a $OUT/gpu_selection_offload_test.log
t0=$SECONDS
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build tests" MEMPIPE_SITE=/tmp/site \
MEMPIPE_TESTS="tests/python/test_selection_offload.py tests/python/test_gpu.py" \
  timeout 330 bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$? ($((SECONDS-t0)) s)" >> /tmp/suite.log
tail -40 /tmp/suite.log | tee $OUT/pytest_tail.log; cp /tmp/o/gpu_pytest.log /tmp/o/build.log $OUT/ 2>/dev/null
true
