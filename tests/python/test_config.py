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
    ("placement=tpu", "placement must be one of"),
    ("aggregation=mean", "aggregation must be max or sum"),
    ("mode=sync,micro_batches=4", "micro_batches must be 1 in sync mode, got 4"),
    ("mode=pipelined,micro_batches=0", "micro_batches must be >= 1, got 0"),
    ("reuse=4,lookahead=true", "lookahead needs reuse=1, got reuse=4"),
    ("fpga_backend=pcie", "fpga_backend must be emulated or xrt, got 'pcie'"),
    ("fpga_functional=rtl", "fpga_functional must be reference or hls, got 'rtl'"),
    ("fpga_fallback=cpu", "fpga_fallback must be gpu or dense, got 'cpu'"),
    ("deadline_ms=0", "deadline_ms must be a positive number of milliseconds, got 0.0"),
    ("deadline_ms=-3", "deadline_ms must be a positive number of milliseconds, got -3.0"),
    ("fpga_append_ring=0", "fpga_append_ring must be in [1, 1024], got 0"),
    ("fpga_append_ring=2000", "fpga_append_ring must be in [1, 1024], got 2000"),
    ("kv_layout=tokens",
     "kv_layout must be auto, head, page, head_kt, page_kt or token, got 'tokens'"),
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


# Issue 14, item 8: configuration accepted what it should reject. Each case below was accepted
# (coerced or silently overridden) before parsing became strict.
@pytest.mark.parametrize("text,message", [
    ("locals=1.7", "locals must be an integer, got '1.7'"),
    ("budget=1e3", "budget must be an integer, got '1e3'"),
    ("reuse=True", "reuse must be an integer, got 'True'"),
    ("budget=2048,budget=4096", "key 'budget' is given twice"),
    (f"budget={2**40}", "budget must fit a 32-bit integer"),
    ("sinks=-99999999999", "sinks must fit a 32-bit integer"),
])
def test_strict_parse_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        config.load(environ={"MEMPIPE_CONFIG": text})


@pytest.mark.parametrize("extra,message", [
    ({"locals": 1.7}, "locals must be an integer, got 1.7"),
    ({"reuse": True}, "reuse must be an integer, got True"),
    ({"budget": "4096.0"}, "budget must be an integer"),
    ({"budget": 2**40}, "budget must fit a 32-bit integer"),
    ({"placement": 3}, "placement must be a string, got 3"),
    ({"aggregation": None}, "aggregation must be a string, got None"),
])
def test_strict_additional_config_refuses(extra, message):
    with pytest.raises(ValueError, match=message):
        config.load(extra, environ={})


def test_direct_construction_is_checked_by_validate():
    assert config.MempipeConfig(locals=1.7).validate() == ["locals must be an integer, got 1.7"]
    assert config.MempipeConfig(reuse=True).validate() == ["reuse must be an integer, got True"]
    assert "budget must fit a 32-bit integer" in config.MempipeConfig(budget=2**40).validate()[0]


def test_budget_is_bounded_by_the_models_context():
    cfg = config.MempipeConfig(budget=8192)
    assert cfg.validate() == []
    assert cfg.validate(max_model_len=8192) == []
    assert cfg.validate(max_model_len=4096) == \
        ["budget 8192 tokens exceeds the model's context max_model_len=4096"]


def test_integer_text_with_sign_and_spaces_still_parses():
    cfg = config.load(environ={"MEMPIPE_CONFIG": "budget= +2048 ,dense_layers=0"})
    assert (cfg.budget, cfg.dense_layers) == (2048, 0)


# Issue 11: the schemes and the fpga placement's keys.
def test_schemes_are_accepted():
    text = ("mode=pipelined,micro_batches=4,reuse=4,reuse_async=false,fpga_backend=xrt,"
            "fpga_paced=false,fpga_functional=hls,fpga_fallback=dense,deadline_ms=2.5")
    cfg = config.load(environ={"MEMPIPE_CONFIG": text})
    assert (cfg.mode, cfg.micro_batches, cfg.reuse, cfg.reuse_async) == \
        ("pipelined", 4, 4, False)
    assert (cfg.fpga_backend, cfg.fpga_paced, cfg.fpga_functional, cfg.fpga_fallback,
            cfg.deadline_ms) == ("xrt", False, "hls", "dense", 2.5)
    assert cfg.validate() == []
    assert config.load(environ={"MEMPIPE_CONFIG": "lookahead=true"}).lookahead is True
    cfg = config.load({"reuse_async": False, "deadline_ms": 7}, environ={})
    assert cfg.reuse_async is False and cfg.deadline_ms == 7.0


def test_fpga_placement_needs_the_offload_engine():
    reasons = config.MempipeConfig(placement="fpga").validate()
    if hasattr(config._mempipe, "SelectionOffload"):
        assert reasons == []
    else:
        assert any("needs the selection-offload engine" in r for r in reasons), reasons


@pytest.mark.parametrize("text,message", [
    ("lookahead=1", "lookahead must be true or false, got '1'"),
    ("reuse_async=yes", "reuse_async must be true or false, got 'yes'"),
    ("fpga_paced=True", "fpga_paced must be true or false, got 'True'"),
    ("deadline_ms=fast", "deadline_ms must be a finite number, got 'fast'"),
    ("deadline_ms=nan", "deadline_ms must be a finite number, got 'nan'"),
    ("micro_batches=2.5", "micro_batches must be an integer, got '2.5'"),
])
def test_strict_parse_of_the_scheme_keys(text, message):
    with pytest.raises(ValueError, match=message):
        config.load(environ={"MEMPIPE_CONFIG": text})


@pytest.mark.parametrize("extra,message", [
    ({"lookahead": 1}, "lookahead must be true or false, got 1"),
    ({"deadline_ms": True}, "deadline_ms must be a finite number, got True"),
    ({"deadline_ms": float("inf")}, "deadline_ms must be a finite number, got inf"),
])
def test_strict_additional_config_of_the_scheme_keys(extra, message):
    with pytest.raises(ValueError, match=message):
        config.load(extra, environ={})


def test_direct_construction_of_the_scheme_keys_is_checked():
    assert config.MempipeConfig(lookahead=1).validate() == \
        ["lookahead must be true or false, got 1"]
    assert config.MempipeConfig(deadline_ms="5").validate() == \
        ["deadline_ms must be a number, got '5'"]
    assert config.MempipeConfig(deadline_ms=float("nan")).validate() == \
        ["deadline_ms must be a positive number of milliseconds, got nan"]


def test_kv_layout_defaults_to_auto_resolved_on_load_and_takes_token():
    """auto, the default, is resolved when the configuration is made: the layout itself is what
    every reader (and a bench's record of the configuration) sees."""
    expected = config.default_kv_layout()
    assert expected in ("page_kt", "head")
    assert config.load(environ={}).kv_layout == expected
    assert config.MempipeConfig().kv_layout == expected
    cfg = config.load(environ={"MEMPIPE_CONFIG": "kv_layout=auto"})
    assert cfg.kv_layout == expected and cfg.validate() == []
    assert "kv_layout='" + expected + "'" in repr(cfg)
    cfg = config.load(environ={"MEMPIPE_CONFIG": "kv_layout=token"})
    assert cfg.kv_layout == "token" and cfg.validate() == []


@pytest.mark.parametrize("kernel, layout", [
    ("avx512-bf16", "page_kt"), ("avx512", "page_kt"), ("avx2", "head"), ("portable", "head")])
def test_auto_kv_layout_follows_the_host_kernels(kernel, layout, monkeypatch):
    """page_kt only where the AVX-512 kernels read it (16 tokens a vector); the AVX2 and
    portable kernels copy transposed K pages back into rows, and read head fastest. A rule that
    always took page_kt, or never, fails here."""
    monkeypatch.setattr(config._mempipe, "active_cpu_kernel", lambda: kernel)
    assert config.default_kv_layout() == layout
    assert config.load(environ={}).kv_layout == layout
    # A layout named in MEMPIPE_CONFIG is kept on any kernel.
    assert config.load(environ={"MEMPIPE_CONFIG": "kv_layout=head"}).kv_layout == "head"


def test_active_cpu_kernel_names_a_host_kernel():
    assert config._mempipe.active_cpu_kernel() in ("avx512-bf16", "avx512", "avx2", "portable")
