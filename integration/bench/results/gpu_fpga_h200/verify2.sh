#!/usr/bin/env bash
# Final verification of main on the H200, part 2 (lead's session script; copied into the results):
# mempipe-bench side by side, then the whole-model runner's fpga rows.
set -o pipefail
for f in .gpuwork/final/pack/*.tar.xz; do tar -xJf "$f" -C .gpuwork/final; done
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/final/prebuilt
export CMAKE_PREFIX_PATH=$D LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:$P/libs CPATH=$D/include \
       PYTHONUNBUFFERED=1 MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
echo "main at $(cat .gpuwork/final/REV)" | tee -a $OUT/device.txt
T0=$SECONDS
for t in gpu_kernels_test gpu_apply_device_test; do
  echo "== $t (MEMPIPE_REQUIRE_GPU=1)"
  MEMPIPE_REQUIRE_GPU=1 timeout 120 $PWD/.gpuwork/final/tests/$t --gtest_brief=1 > /tmp/$t.log 2>&1; r=$?
  grep -E "FAILED|PASSED|SKIPPED|tests ran|Failure|Expected|Which is|tol|error" /tmp/$t.log | head -30; echo "$t rc=$r"
done 2>&1 | tee $OUT/cxx_tests.log
echo "[t] cxx $((SECONDS-T0)) s" | tee -a $OUT/cxx_tests.log
MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build" MEMPIPE_SITE=/tmp/mempipe-site \
  bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
echo "[t] module built at $((SECONDS-T0)) s" | tee -a $OUT/model_decode_fpga.log
export PYTHONPATH=/tmp/mempipe-site
left() { echo $((575 - (SECONDS-T0))); }
md() {  # model_decode.py's fpga rows beside dense-sdpa and gpu
  local c=$1 bs=$2
  [ "$(left)" -gt 70 ] || return
  timeout $(($(left) - 40)) python3 integration/bench/model_decode.py --contexts $c --batches $bs \
    --placements dense-sdpa,gpu,fpga --steps 10 --min_window_s 0.3 \
    --json $OUT/model_decode_fpga_${c}.json --md $OUT/model_decode_fpga_${c}.md \
    > /tmp/md_$c.log 2>&1
  echo "model_decode $c x $bs rc=$? at $((SECONDS-T0)) s" >> /tmp/md_$c.log
  grep -v "^\[" /tmp/md_$c.log | tail -60 >> $OUT/model_decode_fpga.log
}
bench() {  # mempipe-bench: dense, gpu and the fpga pipeline runs side by side (emulated card,
           # paced, functional result by the CPU reference), Llama-3-8B attention shape
  local c=$1 b=$2
  [ "$(left)" -gt 90 ] || return
  timeout $(($(left) - 20)) $PWD/.gpuwork/final/bench/mempipe-bench --layers=32 --context=$c \
    --batch=$b --steps=4 --threads=16 --placements=dense,gpu --fpga_functional=reference \
    --deadline_ms=1000 --pipelines="gpu;fpga;fpga:pipelined:micro_batches=4;fpga:reuse=4" \
    --json=$OUT/bench_${c}_b$b.json 2>&1 | grep -v '^\[' > /tmp/bench_${c}_b$b.log
  echo "bench $c x $b rc=$? at $((SECONDS-T0)) s" >> $OUT/bench.log
  cat /tmp/bench_${c}_b$b.log >> $OUT/bench.log
}
md 32768 1,8
bench 32768 1
md 131072 1
bench 131072 1
echo "[t] done at $((SECONDS-T0)) s"
