#!/usr/bin/env bash
# Package CI step: installs the CPU build (the one .ci/test's CPU suite just built, so nothing is
# rebuilt), then configures, builds and runs tests/consumer/ -- a project outside the tree that
# does find_package(mempipe) and links mempipe::backend -- against the installed package only.
#   bash .ci/consumer.sh        (after .ci/setup; MEMPIPE_BUILD_DIR, default build-ci)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MEMPIPE_BUILD_DIR:-build-ci}
prefix="$PWD/$dir-install"
consumer="$PWD/$dir-consumer"

cmake -S . -B "$dir" -G Ninja -DMEMPIPE_GPU=off -DMEMPIPE_XRT=on -DMEMPIPE_WERROR=ON >/dev/null
cmake --build "$dir" -j "$(nproc)"
rm -rf "$prefix" "$consumer"
cmake --install "$dir" --prefix "$prefix" >/dev/null
echo "[consumer] installed to $prefix"
# Only the install prefix is searched: the source tree is not on any path of the consumer.
cmake -S tests/consumer -B "$consumer" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$consumer"
"$consumer/mempipe_consumer"
