#!/usr/bin/env bash
# Pipeline (issue 5) CI step, after .ci/test's suites (which already run tests/backend/ plain,
# under ASan+UBSan and under TSan): a smoke run of mempipe-bench through the stage pipeline,
# sync and pipelined, checking that every request completed and the JSON carries the metrics.
# The fpga placement runs on the paced emulated U55C (fpga/); --stand-in-gbps only fills devices
# that have no selector in the program (gpu, until its library registers one).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MEMPIPE_BUILD_DIR:-build-ci}
cmake -S . -B "$dir" -G Ninja -DMEMPIPE_GPU=off >/dev/null
cmake --build "$dir" -j "$(nproc)" --target mempipe-bench
out=$(mktemp -d)
common=(--layers=4 --num_heads=8 --num_kv_heads=2 --head_dim=64 --context=4096 --batch=4
        --budget=512 --steps=3 --warmup=1 --placements=dense --stand-in-gbps=410 --threads=1)
for mode in sync pipelined; do
  "$dir/integration/bench/mempipe-bench" "${common[@]}" --placement=fpga --mode=$mode --micro-batches=$([ $mode = sync ] && echo 1 || echo 4) \
    --json="$out/$mode.json" | tee "$out/$mode.txt"
  python3 - "$out/$mode.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
p = [x for x in j["placements"] if "pipeline" in x]
assert len(p) == 1, "no pipeline placement in the JSON"
m = p[0]["pipeline"]
assert m["steps"] == 3, m["steps"]
assert m["requests"] == 3 * 4 * m["micro_batches"], m["requests"]
assert m["selections_by_selector"] + m["fallbacks"] == m["selections_fresh"], m
assert 0.0 <= m["overlap_measured"]["hidden_fraction"] <= 1.0, m["overlap_measured"]
assert p[0]["rel_l2_error"] < 0.5, p[0]["rel_l2_error"]
print(f"pipeline {m['mode']}: {m['requests']} requests, {m['fallbacks']} fallbacks, "
      f"hidden {100 * m['overlap_measured']['hidden_fraction']:.1f}% of selector time")
PY
done
rm -rf "$out"
