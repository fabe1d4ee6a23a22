#!/usr/bin/env bash
# Fuzzing CI step (issue 14): builds the libFuzzer targets of tests/fuzz/ with clang under
# ASan + UBSan and runs each for a bounded slice, starting from the corpus kept in the repo
# (tests/fuzz/corpus/<target>/). Any crash, leak, sanitizer report or oracle abort fails the step
# and leaves the reproducer in build-ci-fuzz/artifacts/.
#
# Environment: MEMPIPE_FUZZ_SECONDS (default 15) per target; MEMPIPE_FUZZ_BUILD (default
# build-ci-fuzz). The long campaign is tests/fuzz/campaign.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${MEMPIPE_FUZZ_SECONDS:-15}
dir=${MEMPIPE_FUZZ_BUILD:-build-ci-fuzz}
targets=(paged_kv_fuzz digest_fuzz select_fuzz decode_fuzz config_fuzz xclbin_fuzz)

CC=clang CXX=clang++ cmake -S . -B "$dir" -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on \
  -DMEMPIPE_SANITIZE=address -DMEMPIPE_FUZZ=ON -DMEMPIPE_BUILD_TESTS=OFF -DMEMPIPE_PYTHON=off \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$dir" -j "$(nproc)" --target "${targets[@]}"

mkdir -p "$dir/artifacts"
for t in "${targets[@]}"; do
  work="$dir/corpus/$t"
  mkdir -p "$work" "tests/fuzz/corpus/$t"
  echo "[fuzz] $t for ${secs}s"
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$dir/tests/fuzz/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/$t-" "$work" "tests/fuzz/corpus/$t" \
    >"$dir/$t.log" 2>&1
  rc=$?
  set -e
  grep -E '^stat::(number_of_executed_units|new_units_added)|^#[0-9]+ +DONE' "$dir/$t.log" || true
  if [ $rc -ne 0 ]; then
    tail -n 60 "$dir/$t.log" >&2
    echo "[fuzz] FAILED: $t exited $rc; reproducer(s): $(ls "$dir/artifacts/$t-"* 2>/dev/null)" >&2
    exit 1
  fi
done
echo "[fuzz] all targets ran their slice without a finding"
