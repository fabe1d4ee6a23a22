#!/usr/bin/env bash
# The quality harness on the H200 through mempipe's GPU path (one device call; see README.md).
# Runs from the repository root of the device's copy, with the carried folder $Q holding:
#   runtime.tar.xz  site/mempipe/ (the mempipe package + _mempipe built for CPython 3.12 with
#                   the GPU kernels, sm_90) and libs/ (its Abseil and CUDA runtime libraries),
#   quality/        integration/quality of this branch, whl/ the gguf wheel,
#   model/          the truncated SmolLM2 GGUF (pack.py), xz-compressed.
set -o pipefail
Q=${Q:-$PWD/.gpuwork/quality2}
OUT=${OUT:-/tmp/quality-h200}
mkdir -p "$OUT/run"
t0=$SECONDS
# The shared setup: staged beside this script, else the device's copy of the checkout.
ENV_SH="$(dirname "${BASH_SOURCE[0]}")/h200_env.sh"
[ -f "$ENV_SH" ] || ENV_SH=$PWD/integration/quality/gpu/h200_env.sh
# shellcheck source=h200_env.sh
. "$ENV_SH" || { echo "FATAL: h200_env.sh is neither beside $0 nor at $ENV_SH" >&2; exit 1; }
h200_setup_runtime || exit 1
python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
  "$Q"/model/*.gguf.xz /tmp/smollm2.gguf || exit 1
export MEMPIPE_SMOLLM_GGUF=/tmp/smollm2.gguf
h200_report_device "$OUT/device.txt"
cd "$Q/quality" || exit 1
timeout 55 python3 gpu/check.py --device cuda --out "$OUT/gpu.pt" 2>&1 \
  | grep -v -E "Converting|Loading weights" | tee "$OUT/check.log"
timeout 35 python3 run.py --grid smoke --tasks passkey --lengths 1024 --depths 0.5 \
  --per-point 1 --ppl-context 960 --ppl-steps 32 --device cuda --no-report --out "$OUT/run" 2>&1 \
  | grep -v -E "Converting|Loading weights" | tee "$OUT/run.log"
timeout 35 python3 step_cost.py --device cuda --length 8000 --steps 5 \
  --json "$OUT/step_cost_8k.json" 2>&1 | grep -v -E "Converting|Loading weights" \
  | tee "$OUT/step_cost.log"
echo "total $((SECONDS - t0)) s" | tee -a "$OUT/device.txt"
