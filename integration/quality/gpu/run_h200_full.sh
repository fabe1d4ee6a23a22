#!/usr/bin/env bash
# The full 30-layer SmolLM2 on the H200 in two device calls (issue 13; see README.md).
# The GGUF (98.4 MB) does not fit one call's 64 MiB carry, so it travels in two parts:
#
#   call 1:  bash run_h200_full.sh stash   carried $Q holds part.a only; copies it to $STASH
#            (an ignored folder that the device keeps while the machine stays warm)
#   call 2:  bash run_h200_full.sh run     carried $Q holds part.b, runtime.tar.xz (mempipe +
#            _mempipe for CPython 3.12 with the GPU kernels, its Abseil/CUDA libraries),
#            quality/ (integration/quality), whl/ (gguf), SHA256 (of part.a, part.b, the GGUF);
#            fails loudly (exit 3) when part.a is not in $STASH any more, then runs the grid
#            on CUDA: four run.py processes side by side on the one GPU (tasks at 8000, 4096
#            and 2048 tokens; perplexity at 8K), each under a time limit (a
#            stopped run keeps every finished case: results.json is rewritten per case).
#
# Environment: Q (default .gpuwork/qual), STASH (default build/qual-h200-stash), OUT, LIMIT
# (seconds for the grid, default 270), CONFIGS (run.py --configs), BUDGETS (default
# 256,512,1024).
set -o pipefail
Q=${Q:-$PWD/.gpuwork/qual}
STASH=${STASH:-$PWD/build/qual-h200-stash}
OUT=${OUT:-/tmp/quality-h200-full}
LIMIT=${LIMIT:-270}
mkdir -p "$OUT"
t0=$SECONDS
case "${1:-}" in
  stash)
    mkdir -p "$STASH" || exit 1
    cp "$Q/part.a" "$STASH/part.a" || exit 1
    (cd "$STASH" && sha256sum part.a) | tee "$OUT/stash.txt"
    echo "stash $((SECONDS - t0)) s; pwd $PWD" | tee -a "$OUT/stash.txt"
    exit 0 ;;
  run) ;;
  *) echo "usage: run_h200_full.sh stash|run" >&2; exit 2 ;;
esac

if [ ! -f "$STASH/part.a" ]; then
  echo "FATAL: $STASH/part.a (model part 1, left by call 1) is gone: the machine was released" \
       "between the calls; nothing was run" | tee "$OUT/device.txt" >&2
  exit 3
fi
cp "$Q/part.b" "$STASH/part.b" || exit 1
(cd "$STASH" && cat part.a part.b > smollm2.gguf && sha256sum -c "$Q/SHA256") 2>&1 \
  | tee "$OUT/device.txt" || { echo "FATAL: model checksum mismatch" >> "$OUT/device.txt"; exit 3; }
# The shared setup: staged beside this script, else the device's copy of the checkout.
ENV_SH="$(dirname "${BASH_SOURCE[0]}")/h200_env.sh"
[ -f "$ENV_SH" ] || ENV_SH=$PWD/integration/quality/gpu/h200_env.sh
# shellcheck source=h200_env.sh
. "$ENV_SH" || { echo "FATAL: h200_env.sh is neither beside $0 nor at $ENV_SH" >&2; exit 1; }
h200_setup_runtime || exit 1
export MEMPIPE_SMOLLM_GGUF="$STASH/smollm2.gguf"
h200_report_device "$OUT/device.txt" -a
cd "$Q/quality" || exit 1
BUDGETS=${BUDGETS:-256,512,1024}
# Per-query-head baseline at matched bytes (issue 13, item 3): per-head budgets around the ones
# whose union of pages equals the GQA budget's (scorers.py's per-query-head sweep on an 8000-
# token capture: union pages ~ 1.85 k - 1 for k pages per query head), so the measured bytes
# bracket GQA-aware selection's.
PH="per_head:256=h144:16:2:max;per_head:512=h256:16:2:max;per_head:512=h288:16:2:max"
PH="$PH;per_head:1024=h512:16:2:max;per_head:1024=h576:16:2:max"
common=(--device cuda --threads 3 --no-report --budgets "$BUDGETS" --axis-budgets ""
        --per-head-budgets "" --page-sizes 16 --aggregations max --dense-layers 2
        --seed "${SEED:-20261130}" --max-new 8 --configs "${CONFIGS:-$PH}")
run() {  # name, then run.py arguments
  local name=$1; shift
  timeout "$LIMIT" python3 run.py "${common[@]}" --out "$OUT/$name" "$@" 2>&1 \
    | grep -v -E "Converting|Loading weights" > "$OUT/$name.log"
  echo "$name rc=$? at $((SECONDS - t0)) s" >> "$OUT/$name.log"
}
for L in 8000 4096 2048; do
  run tasks_$L --tasks passkey,needle --lengths $L --depths 0.25,0.5,0.75 --per-point 5 \
    --ppl-context 0 &
done
run ppl_8k --tasks "" --ppl-context 7936 --ppl-steps 256 --ppl-windows 1 &
wait
for f in "$OUT"/*.log; do tail -3 "$f"; done
echo "total $((SECONDS - t0)) s" | tee -a "$OUT/device.txt"
# The device tool brings back at most 8 files: one archive of the results folders and logs
# (the first run lost tasks_8000/results.json to that limit).
tar -czf "$OUT/results.tgz" -C "$OUT" $(cd "$OUT" && ls -d tasks_* ppl_8k* 2>/dev/null) \
  && (cd "$OUT" && rm -rf tasks_* ppl_8k*)
