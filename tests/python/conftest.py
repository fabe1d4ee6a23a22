"""Shared fixtures: a fresh seed per test (printed, so a failure can be replayed with
MEMPIPE_TEST_SEED=<seed>), and the path of the reference helpers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def gen(request):
    import torch
    seed = int(os.environ.get("MEMPIPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.nodeid}: MEMPIPE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
