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
