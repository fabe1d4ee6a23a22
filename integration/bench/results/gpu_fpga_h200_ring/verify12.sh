#!/usr/bin/env bash
# H200 verification, call 2: the Python suite on CUDA (C++ GPU tests passed in call 1), then the
# whole-model runner's fpga rows (Python front door, CUDA graphs).
source .gpuwork/final/common.sh
build_module | tee -a $OUT/pytest_tail.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="tests" MEMPIPE_SITE=$SITE \
MEMPIPE_TESTS="tests/python --ignore=tests/python/test_vllm_conformance.py --ignore=tests/python/test_vllm_generate.py --ignore=tests/python/test_vllm_schemes.py --ignore=tests/python/test_design_space.py --ignore=tests/python/test_quality_smollm.py --ignore=tests/python/test_model_decode_tp.py" \
  timeout 200 bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/suite.log 2>&1; echo "suite rc=$?" >> /tmp/suite.log
{ grep -E "passed|failed|error|FAILED|ERROR" /tmp/suite.log | tail -30; tail -3 /tmp/suite.log; echo "[t] suite $((SECONDS-T0)) s"; } >> $OUT/pytest_tail.log
cp /tmp/o/gpu_pytest.log $OUT/r/ 2>/dev/null
export PYTHONPATH=$SITE
left() { echo $((585 - (SECONDS-T0))); }
md() {
  local c=$1 bs=$2
  [ "$(left)" -gt 60 ] || return
  timeout $(($(left) - 25)) python3 integration/bench/model_decode.py --contexts $c --batches $bs \
    --placements dense-sdpa,gpu,fpga --fpga_schemes sync,pipelined4,reuse4,lookahead,lookahead_same \
    --steps 10 --min_window_s 0.3 \
    --json $OUT/r/model_decode_fpga_${c}.json --md $OUT/r/model_decode_fpga_${c}.md > /tmp/md_$c.log 2>&1
  echo "model_decode $c x $bs rc=$? at $((SECONDS-T0)) s" >> /tmp/md_$c.log
  grep -v "^\[" /tmp/md_$c.log | tail -80 >> $OUT/model_decode_fpga.log
  cp /tmp/md_$c.log $OUT/r/
}
md 32768 1,8
md 131072 1
echo "[t] done at $((SECONDS-T0)) s" | tee -a $OUT/model_decode_fpga.log
finish
