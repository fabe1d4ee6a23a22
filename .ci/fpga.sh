#!/usr/bin/env bash
# FPGA path CI step (issue 4): checks that the committed v++ connectivity file is what its
# generator prints. The FPGA tests themselves run in .ci/test's suites (see below).
set -euo pipefail
cd "$(dirname "$0")/.."

diff -u fpga/hls/u55c_connectivity.cfg <(bash fpga/hls/make_connectivity.sh 32) \
  || { echo "fpga/hls/u55c_connectivity.cfg is stale: run fpga/hls/make_connectivity.sh 32" >&2; exit 1; }

# The FPGA tests (C simulation, U55C model, emulated device, XRT on the noop shim) run in the
# CPU, ASan and TSan suites of .ci/test, which configure with -DMEMPIPE_XRT=on so a missing XRT
# fails the build instead of skipping them.
echo "[fpga] connectivity file is current"
