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

# -O1 -g1, as .ci/test's sanitizer builds: attention/decode.cc alone took 137 s at -O2 -g under
# clang's ASan + UBSan + fuzzer instrumentation on the 2-core build VM, 93 s at -O1 -g1.
CC=clang CXX=clang++ cmake -S . -B "$dir" -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on \
  -DMEMPIPE_SANITIZE=address -DMEMPIPE_FUZZ=ON -DMEMPIPE_BUILD_TESTS=OFF -DMEMPIPE_PYTHON=off \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" >/dev/null
cmake --build "$dir" -j "$(nproc)" --target "${targets[@]}"

mkdir -p "$dir/artifacts"
# run_one <target>: its slice; output in $dir/<target>.log, exit status in $dir/<target>.rc.
run_one() {
  local t=$1 work="$dir/corpus/$1" rc=0
  mkdir -p "$work" "tests/fuzz/corpus/$t"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$dir/tests/fuzz/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/$t-" "$work" "tests/fuzz/corpus/$t" \
    >"$dir/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$dir/$t.rc"
}
# One target per core at a time: each fuzzer is one process on one core, so a slice runs as many
# inputs as it would alone.
par=$(nproc)
rm -f "$dir"/*.rc
echo "[fuzz] ${#targets[@]} targets, ${secs}s each, $par at a time"
for ((i = 0; i < ${#targets[@]}; i += par)); do
  for t in "${targets[@]:i:par}"; do run_one "$t" & done
  wait
done
failed=0
for t in "${targets[@]}"; do
  echo "[fuzz] $t"
  grep -E '^stat::(number_of_executed_units|new_units_added)|^#[0-9]+ +DONE' "$dir/$t.log" || true
  rc=$(cat "$dir/$t.rc")
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$dir/$t.log" >&2
    echo "[fuzz] FAILED: $t exited $rc; reproducer(s): $(ls "$dir/artifacts/$t-"* 2>/dev/null)" >&2
    failed=1
  fi
done
[ $failed = 0 ] || exit 1
echo "[fuzz] all targets ran their slice without a finding"
