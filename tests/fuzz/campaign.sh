#!/usr/bin/env bash
# A fuzzing campaign over the libFuzzer targets (issue 14): each target runs for its time
# budget, nice'd, on a working corpus seeded from the repo's (tests/fuzz/corpus/<target>/), and
# its final statistics (executions, coverage, corpus size) are collected in a summary. Crashes
# land in <out>/artifacts/ and stop only that target.
#
#   bash tests/fuzz/campaign.sh <build-dir> <out-dir> target:seconds [target:seconds ...]
#
# Afterwards, tests/fuzz/update_corpus.sh <build-dir> <out-dir> minimizes the working corpora
# into the repo's. The build dir is a -DMEMPIPE_FUZZ=ON clang build (see .ci/fuzz.sh).
set -uo pipefail
build=$1 out=$2
shift 2
mkdir -p "$out/artifacts"
for spec in "$@"; do
  t=${spec%%:*} secs=${spec##*:}
  mkdir -p "$out/corpus/$t" "tests/fuzz/corpus/$t"
  log="$out/$t-$(date -u +%H%M%S)-$$.log"  # unique: lanes may run the same target at once
  echo "[campaign] $(date -u +%H:%M:%S) $t for ${secs}s, log $log"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    nice -n 10 "$build/tests/fuzz/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/$t-" "$out/corpus/$t" \
    "tests/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*')
  echo "$t rc=$rc seconds=$secs executions=${execs:-0} $cov" | tee -a "$out/summary.txt"
done
