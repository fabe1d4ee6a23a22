"""MEMPIPE_CONFIG parsing and validate()'s reasons."""

import pytest

from mempipe import config


def test_defaults_are_valid():
    assert config.MempipeConfig().validate() == []


def test_parse_and_env_override():
    env = {"MEMPIPE_CONFIG": "placement=dense, budget=2048 ,page_size=32,dense_layers=0"}
    cfg = config.load({"budget": 512, "aggregation": "sum"}, environ=env)
    assert (cfg.placement, cfg.budget, cfg.page_size, cfg.dense_layers, cfg.aggregation) == \
        ("dense", 2048, 32, 0, "sum")
    assert not cfg.sparse and cfg.validate() == []


@pytest.mark.parametrize("text,message", [
    ("budget", "expected key=value"),
    ("budget=lots", "budget must be an integer, got 'lots'"),
    ("pages=3", "unknown key 'pages'"),
])
def test_parse_errors_name_the_bad_item(text, message):
    with pytest.raises(ValueError, match=message):
        config.load(environ={"MEMPIPE_CONFIG": text})


@pytest.mark.parametrize("text,reason", [
    ("page_size=48", "page_size must be 16, 32 or 64, got 48"),
    ("budget=40", "budget must be a positive multiple of page_size 16, got 40"),
    ("budget=32,sinks=2,locals=1", "cannot hold 2 sink + 1 local pages"),
    ("locals=0", "locals must be >= 1"),
    ("placement=fpga", "placement 'fpga' is not available"),
    ("placement=tpu", "placement must be one of"),
    ("mode=pipelined", "mode 'pipelined' is not available"),
    ("reuse=4", "reuse=4 is not available"),
    ("aggregation=mean", "aggregation must be max or sum"),
])
def test_validate_gives_reasons(text, reason):
    reasons = config.load(environ={"MEMPIPE_CONFIG": text}).validate()
    assert any(reason in r for r in reasons), reasons


def test_gpu_placement_needs_a_gpu_build():
    reasons = config.load(environ={"MEMPIPE_CONFIG": "placement=gpu"}).validate()
    if "cuda" in config.DEVICES:
        assert reasons == []
    else:
        assert any("placement 'gpu' needs a GPU build" in r for r in reasons), reasons


def test_all_reasons_are_reported_together():
    reasons = config.load(environ={"MEMPIPE_CONFIG": "page_size=48,mode=x,reuse=0"}).validate()
    assert len(reasons) == 3


def test_supported_sizes_come_from_the_module():
    from mempipe import _mempipe
    assert config.PAGE_SIZES == _mempipe.supported_block_sizes == (16, 32, 64)
    assert config.HEAD_DIMS == _mempipe.supported_head_dims == (64, 128, 256)
    assert config.DTYPES == _mempipe.supported_dtypes == ("fp32", "fp16", "bf16")
    assert _mempipe.supported_gpu_group_sizes == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
    assert config.MempipeConfig(page_size=128).validate() == \
        ["page_size must be 16, 32 or 64, got 128"]


def test_dense_layers_rule_comes_from_the_module():
    cfg = config.MempipeConfig(dense_layers=2)
    assert [cfg.layer_sparse(layer) for layer in range(4)] == [False, False, True, True]
    assert not config.MempipeConfig(placement="dense", dense_layers=0).layer_sparse(5)
    with pytest.raises(ValueError, match="dense_layers must be >= 0, got -2"):
        config.MempipeConfig(dense_layers=-2).layer_sparse(0)
