#!/usr/bin/env bash
# Final verification of main on the H200 (lead's session script; not part of the repo).
set -o pipefail
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/final/prebuilt
export CMAKE_PREFIX_PATH=$D LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:$P/libs CPATH=$D/include \
       PYTHONUNBUFFERED=1 MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
git_rev=$(cat .gpuwork/final/REV); echo "main at $git_rev" | tee -a $OUT/device.txt
rc=0
for t in gpu_kernels_test gpu_apply_device_test; do
  echo "== $t (MEMPIPE_REQUIRE_GPU=1)"
  MEMPIPE_REQUIRE_GPU=1 $P/$t --gtest_brief=1 > /tmp/$t.log 2>&1; r=$?
  tail -4 /tmp/$t.log; echo "$t rc=$r"; [ $r = 0 ] || rc=1
done 2>&1 | tee $OUT/cxx_tests.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build tests" MEMPIPE_SITE=/tmp/site \
MEMPIPE_TESTS="tests/python --ignore=tests/python/test_vllm_conformance.py --ignore=tests/python/test_vllm_generate.py --ignore=tests/python/test_design_space.py --ignore=tests/python/test_quality_smollm.py" \
  bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$?" >> /tmp/suite.log
tail -25 /tmp/suite.log | tee $OUT/pytest_tail.log; cp /tmp/o/gpu_pytest.log $OUT/ 2>/dev/null
for r in 32768:1:32 131072:1:32; do
  IFS=: read -r c b l <<< "$r"
  $P/mempipe-bench --layers=$l --context=$c --batch=$b --steps=4 --placements=dense,gpu \
    --placement=gpu --json=$OUT/bench_${c}_b$b.json 2>&1 | grep -v '^\[' | tee $OUT/bench_${c}_b$b.log
done
