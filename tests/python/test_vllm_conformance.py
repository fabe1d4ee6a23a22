"""mempipe's vLLM backend against vLLM's own interfaces (the installed vLLM release):
abstract classes fully implemented, the plugin idempotent and discoverable, the builder fed a
CommonAttentionMetadata built as vLLM's model runner builds it, and forward() checked against
the float64 reference for a batch that mixes prefill, chunked prefill and decode requests."""

import importlib.metadata
import inspect

import pytest
import torch

from reference import (ATOL, PagedBatch, random_batch, ref_decode, ref_digests, ref_prefill,
                       ref_scores, ref_select)
from vllm_support import require_vllm

vllm = require_vllm()

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention import backend as vbackend  # noqa: E402
from vllm.v1.attention.backends import registry  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from mempipe.attention import keys_transposed, logical_cache  # noqa: E402
from mempipe.vllm import plugin  # noqa: E402
from mempipe.vllm.testing import common_metadata  # noqa: E402
from mempipe.vllm.backend import (MempipeAttentionBackend, MempipeAttentionImpl,  # noqa: E402
                                  MempipeMetadataBuilder, as_mempipe_cache, layer_index_of)


def test_vllm_version_is_reported():
    print(f"vLLM {vllm.__version__}, torch {torch.__version__}")
    assert vllm.__version__


def test_classes_implement_vllm_abstract_interfaces():
    assert issubclass(MempipeAttentionBackend, vbackend.AttentionBackend)
    assert issubclass(MempipeMetadataBuilder, vbackend.AttentionMetadataBuilder)
    assert issubclass(MempipeAttentionImpl, vbackend.AttentionImpl)
    for cls in (MempipeAttentionBackend, MempipeMetadataBuilder, MempipeAttentionImpl):
        assert not inspect.isabstract(cls), (cls, cls.__abstractmethods__)
    assert MempipeAttentionBackend.get_impl_cls() is MempipeAttentionImpl
    assert MempipeAttentionBackend.get_builder_cls() is MempipeMetadataBuilder
    assert not MempipeAttentionBackend.is_sparse()  # vLLM reserves it for indexer models
    # Signatures follow vLLM's abstract methods parameter by parameter.
    for name in ("build",):
        want = list(inspect.signature(getattr(vbackend.AttentionMetadataBuilder, name)).parameters)
        got = list(inspect.signature(getattr(MempipeMetadataBuilder, name)).parameters)
        assert got == want, name
    want = list(inspect.signature(vbackend.AttentionImpl.forward).parameters)
    assert list(inspect.signature(MempipeAttentionImpl.forward).parameters) == want
    init_want = list(inspect.signature(vbackend.AttentionImpl.__init__).parameters)
    init_got = list(inspect.signature(MempipeAttentionImpl.__init__).parameters)
    assert init_got[:len(init_want)] == init_want


def test_entry_point_is_installed_and_loaded_by_vllm():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "mempipe"]
    assert ours and ours[0].value == "mempipe.vllm.plugin:register"
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    assert registry.AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH


def test_register_is_idempotent_and_cpu_selection_honours_custom():
    from vllm.platforms.cpu import CpuPlatform
    plugin.register()
    wrapped = CpuPlatform.__dict__["get_attn_backend_cls"]
    plugin.register()
    plugin.register()
    assert CpuPlatform.__dict__["get_attn_backend_cls"] is wrapped  # wrapped once only
    assert registry.AttentionBackendEnum.CUSTOM.get_class() is MempipeAttentionBackend
    enum = registry.AttentionBackendEnum
    assert CpuPlatform.get_attn_backend_cls(enum.CUSTOM, None) == plugin.BACKEND_PATH
    # Other selections still get vLLM's own answer (the CPU platform's default backend).
    from vllm.v1.attention.selector import AttentionSelectorConfig
    sel = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=16, use_mla=False, has_sink=False,
                                  use_sparse=False, use_mm_prefix=False,
                                  use_per_head_quant_scales=False, attn_type="decoder")
    assert CpuPlatform.get_attn_backend_cls(None, sel) == enum.CPU_ATTN.get_path()


def _validate(**overrides):
    from vllm.platforms.interface import DeviceCapability
    args = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=16,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(0, 0),
                attn_type="decoder")
    args.update(overrides)
    return MempipeAttentionBackend.validate_configuration(**args)


def test_validate_configuration_returns_reasons(monkeypatch):
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024")
    with set_current_vllm_config(VllmConfig()):
        assert _validate() == []
        assert "head_size not supported" in _validate(head_size=80)
        # Blocks that are a multiple of page_size (16 by default) are split into pages by
        # vLLM (the kernel block size the backend declares); others are refused, naming both.
        assert _validate(block_size=32) == [] and _validate(block_size=128) == []
        assert MempipeAttentionBackend.get_supported_kernel_block_sizes() == [16]
        assert any("page_size 16 does not divide vLLM's block size 24" in r
                   for r in _validate(block_size=24))
        monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024,page_size=64")
        assert MempipeAttentionBackend.get_supported_kernel_block_sizes() == [64]
        assert any("page_size 64 does not divide vLLM's block size 32" in r
                   for r in _validate(block_size=32))
        assert _validate(block_size=128) == []
        monkeypatch.setenv("MEMPIPE_CONFIG", "budget=24,mode=sync,micro_batches=3")
        reasons = _validate()
        assert any("budget must be a positive multiple" in r for r in reasons)
        assert any("micro_batches must be 1 in sync mode" in r for r in reasons)
        # Issue 11: placement fpga and the schemes are accepted (with the engine in the build).
        monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024,placement=fpga,mode=pipelined,"
                           "micro_batches=2,reuse=4,fpga_fallback=dense")
        assert _validate() == []
        monkeypatch.setenv("MEMPIPE_CONFIG", "bogus=1")
        assert any("unknown key 'bogus'" in r for r in _validate())


def test_kernel_block_size_is_the_page_size_outside_a_current_config(monkeypatch):
    # vLLM asks for the kernel block sizes while it builds the cache specs, where no vLLM
    # configuration is current: the page size of the one this process last loaded from vLLM's
    # (the layers' validation), else MEMPIPE_CONFIG's, else (unparsable) every page size.
    from mempipe import config as mempipe_config
    from mempipe.vllm import backend as vb
    monkeypatch.setattr(vb, "_loaded_page_size", None)
    monkeypatch.setenv("MEMPIPE_CONFIG", "page_size=32")
    assert MempipeAttentionBackend.get_supported_kernel_block_sizes() == [32]
    monkeypatch.delenv("MEMPIPE_CONFIG")
    vb.load_config(VllmConfig(additional_config={"mempipe": {"page_size": 64}}))
    assert MempipeAttentionBackend.get_supported_kernel_block_sizes() == [64]
    monkeypatch.setattr(vb, "_loaded_page_size", None)
    assert MempipeAttentionBackend.get_supported_kernel_block_sizes() == [16]  # the default
    monkeypatch.setenv("MEMPIPE_CONFIG", "page_size=48")
    assert (MempipeAttentionBackend.get_supported_kernel_block_sizes()
            == list(mempipe_config.PAGE_SIZES))


def test_config_from_vllm_additional_config(monkeypatch):
    monkeypatch.delenv("MEMPIPE_CONFIG", raising=False)
    vc = VllmConfig(additional_config={"mempipe": {"budget": 512, "dense_layers": 0}})
    with set_current_vllm_config(vc):
        impl = MempipeAttentionImpl(4, 64, 0.125, 2)
    assert impl.config.budget == 512 and impl.config.dense_layers == 0
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=256")
    with set_current_vllm_config(vc):
        assert MempipeAttentionImpl(4, 64, 0.125, 2).config.budget == 256  # env wins


def test_unsupported_features_raise():
    with set_current_vllm_config(VllmConfig()):
        with pytest.raises(NotImplementedError, match="sliding_window"):
            MempipeAttentionImpl(4, 64, 0.125, 2, sliding_window=128)
        with pytest.raises(NotImplementedError, match="kv_cache_dtype"):
            MempipeAttentionImpl(4, 64, 0.125, 2, kv_cache_dtype="fp8")


def test_layer_index_from_vllm_layer_names():
    assert layer_index_of("model.layers.7.self_attn.attn") == 7
    assert layer_index_of("language_model.model.layers.12.self_attn.attn") == 12
    with pytest.raises(ValueError):
        layer_index_of("attn")


# ---- builder + forward on a batch built the way vLLM's model runner builds it ------------------

BS, KVH, H, D = 16, 2, 4, 64


class FakeLayer:
    """The attributes of vLLM's Attention layer that the impl reads."""

    def __init__(self, index):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


def _builder(vc):
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=KVH, head_size=D, dtype=torch.float32)
    return MempipeMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vc,
                                  torch.device("cpu"))


@pytest.mark.parametrize("kv_layout", ["head", "page", "head_kt", "page_kt", "token"])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-batch", "decode-batch"])
@pytest.mark.parametrize("layer_index,budget", [(0, 4096), (3, 4096), (3, 48)],
                         ids=["dense-layer", "sparse-full-budget", "sparse-small-budget"])
def test_builder_and_forward_match_reference(gen, monkeypatch, layer_index, budget, mixed,
                                             kv_layout):
    monkeypatch.setenv("MEMPIPE_CONFIG",
                       f"budget={budget},dense_layers=2,page_size={BS},kv_layout={kv_layout}")
    seq_lens = [int(torch.randint(BS * 4, BS * 12, (1,), generator=gen)) for _ in range(4)]
    # Request 0 and 2 decode one token, 1 is a whole prompt, 3 a prefill chunk.
    query_lens = [1, seq_lens[1], 1, 5] if mixed else [1, 1, 1, 1]
    # The whole context of every request, in a shuffled block layout; the cache is written by
    # forward() itself for the tokens of this step, earlier tokens beforehand.
    batch = random_batch(gen, torch.float32, BS, KVH, D, seq_lens)
    vllm_cache = torch.full((batch.kv_cache.shape[1], KVH, BS, 2 * D), float("nan"))
    ours = as_mempipe_cache(vllm_cache, KVH, D, kv_layout)
    assert ours.data_ptr() == vllm_cache.data_ptr()  # a reinterpretation, not a copy
    assert ours.is_contiguous() == (kv_layout == "token")
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        impl = MempipeAttentionImpl(H, D, D ** -0.5, KVH)
        meta = _builder(vc).build(0, common_metadata(batch.block_table, seq_lens, query_lens, BS))
    layer = FakeLayer(layer_index)
    # Earlier steps: the tokens before this step's, appended through forward's own path.
    paged = impl._paged_layer(layer)
    for s, (n, q) in enumerate(zip(seq_lens, query_lens)):
        if n - q:
            slots = batch.block_table[s, torch.arange(n - q) // BS].long() * BS + \
                torch.arange(n - q) % BS
            paged.append(ours, slots, batch.keys[s][:n - q], batch.values[s][:n - q])
    key = torch.cat([batch.keys[s][n - q:] for s, (n, q) in enumerate(zip(seq_lens, query_lens))])
    value = torch.cat([batch.values[s][n - q:]
                       for s, (n, q) in enumerate(zip(seq_lens, query_lens))])
    query = torch.randn(key.shape[0], H, D, generator=gen)
    output = torch.full((key.shape[0], H * D), float("nan"))
    impl.forward(layer, query, key, value, vllm_cache, meta, output)
    # The cache forward wrote, read in logical order (head_kt / page_kt: K pages transposed).
    assert keys_transposed(ours) == kv_layout.endswith("_kt")
    torch.testing.assert_close(logical_cache(ours), batch.kv_cache, equal_nan=True, rtol=0,
                               atol=0)

    starts = meta.query_start_loc
    want = ref_prefill(query, starts, batch, D ** -0.5)  # dense causal for every token
    if layer_index >= 2:
        for blk, d in ref_digests(batch).items():
            assert torch.equal(paged.digests(ours)[blk], d)
        dec = [0, 2] if mixed else [0, 1, 2, 3]
        sub = PagedBatch(
            batch.kv_cache, batch.block_table[dec], batch.seq_lens[dec],
            [batch.keys[i] for i in dec], [batch.values[i] for i in dec], BS)
        qd = query[starts[dec].long()]
        pages = ref_select(ref_scores(qd, sub, paged.digests(ours), "max"),
                           sub.seq_lens.tolist(), BS, budget, 1, 1)
        want[starts[dec].long()] = ref_decode(qd, sub, D ** -0.5, pages=pages)
        if budget < 4096:
            assert any(len(p) < -(-n // BS) for row, n in zip(pages, sub.seq_lens.tolist())
                       for p in row), "the small budget must drop pages"
    torch.testing.assert_close(output.view(-1, H, D).double(), want, atol=ATOL[torch.float32],
                               rtol=0)


def test_warmup_forward_without_metadata_returns_output():
    with set_current_vllm_config(VllmConfig()):
        impl = MempipeAttentionImpl(H, D, 0.125, KVH)
    out = torch.zeros(3, H * D)
    assert impl.forward(FakeLayer(0), torch.zeros(3, H, D), torch.zeros(3, KVH, D),
                        torch.zeros(3, KVH, D), torch.zeros(4, KVH, BS, 2 * D), None, out) is out


def test_cli_flag_maps_to_custom():
    """`--attention-backend CUSTOM` on vLLM's command line reaches the CUSTOM registry entry."""
    from vllm.config import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", "m",
                                                       "--attention-backend", "CUSTOM"]))
    backend = AttentionConfig.validate_backend_before(args.attention_backend)
    assert backend == registry.AttentionBackendEnum.CUSTOM
    plugin.register()
    assert backend.get_class() is MempipeAttentionBackend


def test_as_mempipe_cache_lays_host_caches_out_as_asked():
    """head: the region is [2, blocks, KVH, page, D] in memory, seen as [2, blocks, page, KVH, D]
    (a view, no copy); page: [blocks, KVH, 2, page, D], each block in its own slice; token: the
    contiguous [2, blocks, page, KVH, D]; anything else refused."""
    region = torch.arange(6 * KVH * BS * 2 * D, dtype=torch.float32).view(6, KVH, BS, 2 * D)
    head = as_mempipe_cache(region, KVH, D, "head")
    page = as_mempipe_cache(region, KVH, D, "page")
    token = as_mempipe_cache(region, KVH, D, "token")
    assert head.shape == page.shape == token.shape == (2, 6, BS, KVH, D)
    assert head.data_ptr() == page.data_ptr() == token.data_ptr() == region.data_ptr()
    assert token.is_contiguous() and not head.is_contiguous() and not page.is_contiguous()
    flat = region.view(-1)
    # Element (K/V, block, token, head, channel) sits at the layout's offset in the region; for
    # page, inside block b's own slice region[b].
    for kv, b, t, h, c in [(0, 0, 1, 1, 0), (1, 5, BS - 1, KVH - 1, D - 1), (0, 3, 2, 0, 7)]:
        assert head[kv, b, t, h, c] == flat[(((kv * 6 + b) * KVH + h) * BS + t) * D + c]
        assert page[kv, b, t, h, c] == flat[(((b * KVH + h) * 2 + kv) * BS + t) * D + c]
        assert token[kv, b, t, h, c] == flat[(((kv * 6 + b) * BS + t) * KVH + h) * D + c]
    assert (page[:, 4].flatten().sort().values == region[4].flatten().sort().values).all()
    with pytest.raises(ValueError, match="kv_layout must be head, page, head_kt, page_kt or token, got 'rows'"):
        as_mempipe_cache(region, KVH, D, "rows")


# ---- layers that share another layer's KV cache (issue 14, item 2) -----------------------------

def test_kv_sharing_layer_scores_with_the_targets_digests(gen, monkeypatch):
    """A layer with kv_sharing_target_layer_name appends nothing; before, it scored with its own
    digest buffer, left at NaN, so selection fell back to position order. Now it reads the
    target's digests (kept even though the target, layer 0, decodes densely), and its output
    is the reference over the pages the real digests select."""
    budget = 3 * BS  # 1 sink + 1 local + 1 chosen middle page out of >= 6
    monkeypatch.setenv("MEMPIPE_CONFIG", f"budget={budget},dense_layers=2,page_size={BS}")
    import types
    seq_lens = [int(torch.randint(BS * 8, BS * 12, (1,), generator=gen)) for _ in range(4)]
    query_lens = [1, 1, 1, 1]
    batch = random_batch(gen, torch.float32, BS, KVH, D, seq_lens)
    vllm_cache = torch.full((batch.kv_cache.shape[1], KVH, BS, 2 * D), float("nan"))
    target_name = "model.layers.0.self_attn.attn"
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        target = MempipeAttentionImpl(H, D, D ** -0.5, KVH)
        vc.compilation_config.static_forward_context[target_name] = types.SimpleNamespace(
            impl=target)
        sharer = MempipeAttentionImpl(H, D, D ** -0.5, KVH,
                                      kv_sharing_target_layer_name=target_name)
        meta = _builder(vc).build(0, common_metadata(batch.block_table, seq_lens, query_lens, BS))
    ours = as_mempipe_cache(vllm_cache, KVH, D, target.config.kv_layout)  # the default, auto
    tpaged = target._paged_layer(FakeLayer(0))
    for s, n in enumerate(seq_lens):
        slots = batch.block_table[s, torch.arange(n - 1) // BS].long() * BS + \
            torch.arange(n - 1) % BS
        tpaged.append(ours, slots, batch.keys[s][:n - 1], batch.values[s][:n - 1])
    key = torch.cat([batch.keys[s][n - 1:] for s, n in enumerate(seq_lens)])
    value = torch.cat([batch.values[s][n - 1:] for s, n in enumerate(seq_lens)])
    target.forward(FakeLayer(0), torch.randn(4, H, D, generator=gen), key, value, vllm_cache,
                   meta, torch.empty(4, H * D))
    query = torch.randn(4, H, D, generator=gen)
    output = torch.full((4, H * D), float("nan"))
    sharer.forward(FakeLayer(5), query, key, value, vllm_cache, meta, output)

    spaged = sharer._paged_layer(FakeLayer(5))
    digests = spaged.digests(ours)
    for blk, d in ref_digests(batch).items():
        assert torch.equal(digests[blk], d), f"block {blk}: the sharing layer's digest is wrong"
    pages = ref_select(ref_scores(query, batch, digests, "max"), batch.seq_lens.tolist(), BS,
                       budget, 1, 1)
    position_only = [[[0, 1, -(-n // BS) - 1]] * KVH for n in seq_lens]
    assert pages != position_only, "the check needs a selection that differs from position order"
    want = ref_decode(query, batch, D ** -0.5, pages=pages)
    torch.testing.assert_close(output.view(-1, H, D).double(), want, atol=ATOL[torch.float32],
                               rtol=0)


def test_kv_sharing_with_a_target_that_is_not_mempipe_is_refused():
    with set_current_vllm_config(VllmConfig()):
        with pytest.raises(NotImplementedError, match="shares the KV cache of 'model.layers.9"):
            MempipeAttentionImpl(H, D, 0.125, KVH,
                                 kv_sharing_target_layer_name="model.layers.9.self_attn.attn")
