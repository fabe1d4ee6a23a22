# shellcheck shell=bash
# The device-side setup that run_h200.sh and run_h200_full.sh share; sourced by both (from
# beside them in the staged quality/gpu/, else from the device's copy of the checkout), never
# run by itself.
#
#   h200_setup_runtime            unpacks $Q/runtime.tar.xz (site/mempipe/ + libs/) into $RT,
#                                 installs $Q/whl/*.whl (gguf) into /tmp/site, exports
#                                 PYTHONPATH, LD_LIBRARY_PATH and the NCCL/torch settings
#                                 (NVLink multicast off); returns 1 on the first failure
#   h200_report_device FILE [tee options]
#                                 prints the GPU, torch and mempipe's devices and the setup
#                                 time since $t0, to stdout and (tee) FILE
RT=/tmp/mempipe-rt

h200_setup_runtime() {
  mkdir -p "$RT" && tar -xJf "$Q/runtime.tar.xz" -C "$RT" || return 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    LD_LIBRARY_PATH="$RT/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$Q"/whl/*.whl \
    || return 1
  export PYTHONPATH="$RT/site:/tmp/site"
}

h200_report_device() {
  local file=$1
  shift
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, mempipe; print('torch', torch.__version__, 'mempipe devices', mempipe.devices)"
    echo "setup $((SECONDS - ${t0:?t0 is set by the sourcing script})) s"; } 2>&1 | tee "$@" "$file"
}
