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
