"""MEMPIPE_CONFIG's digest_dtype key (int8 digests, retriever/int8_quant.h)."""

import pytest

from mempipe import config


def test_native_is_the_default_and_valid():
    cfg = config.MempipeConfig()
    assert cfg.digest_dtype == "native" and cfg.validate() == []
    assert config.load(environ={"MEMPIPE_CONFIG": "digest_dtype=native"}).validate() == []


@pytest.mark.parametrize("placement", ["cpu", "fpga", "dense"])
def test_int8_parses_and_runs_from_python(placement):
    cfg = config.load(environ={"MEMPIPE_CONFIG": f"digest_dtype=int8,placement={placement}"})
    assert cfg.digest_dtype == "int8" and cfg.placement == placement
    # Every placement this build runs takes int8 digests (tests/python/test_int8_digests.py).
    assert cfg.validate() == []



@pytest.mark.parametrize("value", ["fp8", "INT8", ""])
def test_other_values_are_named(value):
    reasons = config.MempipeConfig(digest_dtype=value).validate()
    assert any(f"digest_dtype must be native or int8, got '{value}'" in r for r in reasons), \
        reasons


def test_int8_from_additional_config_and_a_non_string_is_refused():
    assert config.load({"digest_dtype": "int8"}, environ={}).digest_dtype == "int8"
    with pytest.raises(ValueError, match="digest_dtype must be a string"):
        config.load({"digest_dtype": 8}, environ={})
