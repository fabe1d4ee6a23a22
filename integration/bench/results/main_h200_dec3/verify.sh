#!/usr/bin/env bash
# Verification of main on the H200 (session script; copied into the results).
set -o pipefail
tar -xJf .gpuwork/pack/bins.tar.xz -C .gpuwork || exit 1
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/prebuilt; T=$PWD/.gpuwork/tests
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu CPATH=$D/include PYTHONUNBUFFERED=1 \
       MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu MEMPIPE_XRT_LIBDIR=$D/lib/x86_64-linux-gnu
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "main at $(cat .gpuwork/REV)"; nproc; grep -m1 'model name' /proc/cpuinfo
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } | tee $OUT/device.txt
T0=$SECONDS
for t in gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test; do
  echo "== $t (MEMPIPE_REQUIRE_GPU=1)"
  MEMPIPE_REQUIRE_GPU=1 timeout 240 $T/$t --gtest_brief=1 > /tmp/$t.log 2>&1; r=$?
  grep -E "FAILED|PASSED|SKIPPED|tests ran|Failure|error" /tmp/$t.log | tail -12; echo "$t rc=$r"
done 2>&1 | tee $OUT/cxx_tests.log
echo "[t] cxx $((SECONDS-T0)) s" | tee -a $OUT/cxx_tests.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build tests hf" MEMPIPE_SITE=/tmp/mempipe-site \
MEMPIPE_TESTS="tests/python --ignore=tests/python/test_vllm_conformance.py --ignore=tests/python/test_vllm_generate.py --ignore=tests/python/test_vllm_schemes.py --ignore=tests/python/test_vllm_overhead.py --ignore=tests/python/test_vllm_profile.py --ignore=tests/python/test_vllm_tp.py --ignore=tests/python/test_design_space.py --ignore=tests/python/test_quality_smollm.py --ignore=tests/python/test_model_decode_tp.py" \
  timeout 430 bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$?" >> /tmp/suite.log
{ grep -E "passed|failed|error|FAILED|ERROR|mempipe devices" /tmp/suite.log | tail -40; tail -3 /tmp/suite.log; echo "[t] suite $((SECONDS-T0)) s"; } > $OUT/pytest_tail.log
cp /tmp/o/gpu_pytest.log /tmp/o/hf_llama_h200.log /tmp/o/hf_llama_h200.json $OUT/ 2>/dev/null
for r in 32768:1:32 131072:1:32; do
  IFS=: read -r c b l <<< "$r"
  timeout 120 $T/mempipe-bench --layers=$l --context=$c --batch=$b --steps=4 --placements=dense,gpu \
    --placement=gpu --json=/tmp/bench_${c}_b$b.json 2>&1 | grep -v '^\[' >> $OUT/bench.log
done
cp /tmp/bench_131072_b1.json $OUT/ 2>/dev/null
echo "[t] all $((SECONDS-T0)) s" | tee -a $OUT/bench.log
