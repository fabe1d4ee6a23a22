"""Shared fixtures: a fresh seed per test (printed, so a failure can be replayed with
MEMPIPE_TEST_SEED=<seed>). The helper modules beside this file (reference, tiny_llama,
vllm_support) are importable through pytest's `pythonpath` setting in pyproject.toml."""

import os

import pytest


@pytest.fixture
def gen(request):
    import torch
    seed = int(os.environ.get("MEMPIPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.nodeid}: MEMPIPE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cuda():
    """The CUDA device for GPU tests. They skip without a GPU or without a GPU build of the
    module; MEMPIPE_REQUIRE_GPU=1 (on the GPU machine) turns that skip into a failure."""
    import torch

    import mempipe
    reason = None
    if "cuda" not in mempipe.devices:
        reason = f"this mempipe build runs {mempipe.devices} only (no GPU kernels)"
    elif not torch.cuda.is_available():
        reason = "no CUDA device"
    if reason is not None:
        if os.environ.get("MEMPIPE_REQUIRE_GPU") == "1":
            pytest.fail(f"MEMPIPE_REQUIRE_GPU=1 but {reason}")
        pytest.skip(reason)
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def noop_xrt(tmp_path, monkeypatch):
    """Points XRT at its noop shim for this test, as tests/fpga/noop_xrt.h does for the C++
    tests (recipe in docs/FPGA-NOTES.md): XILINX_XRT a private directory whose `lib` links to
    the directory of the XRT library this process loaded with the module (none loaded: the
    module was built without XRT, and nothing is set), XCL_EMULATION_MODE=noop and an xrt.ini
    through XRT_INI_PATH. XRT reads these at its first device open, so they must be set before
    the test's first XRT call. Returns whether XRT is loaded."""
    import importlib
    importlib.import_module("mempipe")  # loads the module, and XRT where it was built with XRT
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libxrt_coreutil.so" in line}
    if not libs:
        return False
    (tmp_path / "lib").symlink_to(os.path.dirname(sorted(libs)[0]))
    ini = tmp_path / "xrt.ini"
    ini.write_text("[Runtime]\nnoop_completion_delay_us=0\n")
    monkeypatch.setenv("XILINX_XRT", str(tmp_path))
    monkeypatch.setenv("XCL_EMULATION_MODE", "noop")
    monkeypatch.setenv("XRT_INI_PATH", str(ini))
    return True
