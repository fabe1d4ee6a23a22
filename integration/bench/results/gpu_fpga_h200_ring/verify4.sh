#!/usr/bin/env bash
# H200 verification, call 3: the whole-model runner's fpga rows at 32K (batch 1 and 8), then
# mempipe-bench side by side at 32K/128K x batch 1/8 (8 layers of Llama-3-8B attention: per-layer
# shape unchanged, 4x less fill time; 128K x 8 at 32 layers would need 128 GiB of KV).
source .gpuwork/final/common.sh
build_module | tee -a $OUT/model_decode_fpga.log
export PYTHONPATH=$SITE
left() { echo $((585 - (SECONDS-T0))); }
timeout 260 python3 integration/bench/model_decode.py --contexts 32768 --batches 1,8 \
  --placements dense-sdpa,gpu,fpga --fpga_schemes sync,pipelined4,reuse4,lookahead,lookahead_same \
  --steps 10 --min_window_s 0.3 \
  --json $OUT/r/model_decode_fpga_32768.json --md $OUT/r/model_decode_fpga_32768.md > /tmp/md.log 2>&1
echo "model_decode 32768 x 1,8 rc=$? at $((SECONDS-T0)) s" >> /tmp/md.log
grep -v "^\[\|UserWarning\|scaled_dot_product" /tmp/md.log | tail -40 > $OUT/model_decode_fpga.log
bench() {
  local c=$1 b=$2 l=$3
  [ "$(left)" -gt 40 ] || { echo "bench $c x $b skipped: time" >> $OUT/bench.log; return; }
  timeout $(($(left) - 10)) $PWD/.gpuwork/final/bench/mempipe-bench --layers=$l --context=$c \
    --batch=$b --steps=4 --threads=16 --placements=dense,gpu --fpga_functional=reference \
    --pipelines="gpu;fpga;fpga:pipelined:micro_batches=4;fpga:reuse=4" \
    --json=$OUT/r/bench_${c}_b${b}_l${l}.json 2>&1 | grep -v '^\[' > /tmp/bench_${c}_b$b.log
  echo "bench $c x $b ($l layers) rc=$? at $((SECONDS-T0)) s" >> $OUT/bench.log
  cat /tmp/bench_${c}_b$b.log >> $OUT/bench.log
}
bench 32768 1 8
bench 131072 1 8
bench 32768 8 8
bench 131072 8 8
echo "[t] done at $((SECONDS-T0)) s" | tee -a $OUT/bench.log
finish
