"""Imports vLLM for the tests that need it: skipped where vLLM is absent, unless
MEMPIPE_REQUIRE_VLLM=1 (CI), where its absence is a failure."""

import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def require_vllm():
    if os.environ.get("MEMPIPE_REQUIRE_VLLM") == "1":
        import vllm
        return vllm
    return pytest.importorskip("vllm")
