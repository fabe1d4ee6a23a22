#!/usr/bin/env bash
# Lint CI step: clang-format over every C++/HIP file in the tree (the repo's .clang-format;
# fails on any difference), then clang-tidy (.clang-tidy: a short list of bug-class checks)
# over the C++ sources of the CPU build, from its compile_commands.json. The HIP/CUDA sources
# are format-checked only: clang-tidy would need a GPU compilation database. About a minute.
#   bash .ci/lint.sh            (after .ci/setup; uses MEMPIPE_BUILD_DIR, default build-ci)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MEMPIPE_BUILD_DIR:-build-ci}

mapfile -t all < <(git ls-files '*.h' '*.cc' '*.hip')
echo "[lint] clang-format: ${#all[@]} files"
clang-format --dry-run --Werror "${all[@]}"

# The CPU suite's configuration (.ci/test), so after it nothing is reconfigured or rebuilt.
[ -f "$dir/compile_commands.json" ] ||
  cmake -S . -B "$dir" -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on -DMEMPIPE_WERROR=ON >/dev/null
# The libraries, bindings and bench (tests excluded: gtest macros, and dtype_test's _Float16
# that clang rejects on x86-64 without extra flags). The module's GCC-only LTO flag is ignored.
# Programs kept beside a result under integration/bench/results/ are not built (each says how to
# compile it) and have no compile commands.
mapfile -t sources < <(git ls-files '*.cc' | grep -v -e '^tests/' -e '^integration/bench/results/')
echo "[lint] clang-tidy: ${#sources[@]} C++ sources of the CPU build"
run-clang-tidy -quiet -p "$dir" -j "$(nproc)" -extra-arg=-Wno-ignored-optimization-argument \
  "${sources[@]/#/$PWD/}" >"$dir/clang-tidy.log" 2>&1 ||
  { grep -E 'error:|warning:' "$dir/clang-tidy.log" >&2 || tail -50 "$dir/clang-tidy.log" >&2; exit 1; }
echo "[lint] OK"
