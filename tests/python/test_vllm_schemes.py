"""The vLLM backend with placement=fpga and the schemes (issue 11), on vLLM's CPU worker path
(host tensors: the selection-offload engine's CPU mode): decode steps through the metadata
builder and MempipeAttentionImpl.forward of two sparse layers, bit-identical to placement=cpu
under each scheme, with one engine per builder (model) answering every request."""

import pytest
import torch

from vllm_support import require_vllm

vllm = require_vllm()

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention import backend as vbackend  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from mempipe import schemes  # noqa: E402
from mempipe.vllm.backend import (MempipeAttentionImpl, MempipeMetadataBuilder,  # noqa: E402
                                  as_mempipe_cache)

BS, KVH, H, D = 16, 2, 4, 64

SCHEMES = {
    "sync": "",
    "pipelined": ",mode=pipelined,micro_batches=2",
    "reuse": ",reuse=3",
    "lookahead": ",lookahead=true,lookahead_query=same",  # projected: refused (hf only)
}


class FakeLayer:
    def __init__(self, index):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


def _metadata(block_table, seq_lens):
    """A decode-only CommonAttentionMetadata (one new token per request) on the CPU."""
    n = len(seq_lens)
    qsl = torch.arange(n + 1, dtype=torch.int32)
    positions = torch.tensor(seq_lens) - 1
    slot_mapping = block_table[torch.arange(n), positions // BS].long() * BS + positions % BS
    return vbackend.CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=n, num_actual_tokens=n,
        max_query_len=1, max_seq_len=max(seq_lens), block_table_tensor=block_table,
        slot_mapping=slot_mapping, causal=True, positions=positions)


def _run(monkeypatch, placement, scheme, seed, steps=6, budget=48):
    monkeypatch.setenv("MEMPIPE_CONFIG", f"placement={placement},budget={budget},dense_layers=2,"
                       f"page_size={BS}" + SCHEMES[scheme])
    g = torch.Generator().manual_seed(seed)
    lens = [int(torch.randint(BS * 4, BS * 9, (1,), generator=g)) for _ in range(3)]
    blocks = 3 * 12
    block_table = torch.randperm(blocks, generator=g)[:36].view(3, 12).to(torch.int32)
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        impls = [MempipeAttentionImpl(H, D, D ** -0.5, KVH) for _ in range(2)]
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=KVH, head_size=D,
                                 dtype=torch.float32)
        builder = MempipeMetadataBuilder(spec, ["model.layers.2.self_attn.attn"], vc,
                                         torch.device("cpu"))
    caches = [torch.zeros(blocks, KVH, BS, 2 * D) for _ in range(2)]
    layers = [FakeLayer(2), FakeLayer(3)]
    # The prompts, through forward's own append path (placement fpga: to the card too).
    for impl, layer, cache in zip(impls, layers, caches):
        paged = impl._paged_layer(layer)
        paged.plan = builder.plan
        ours = as_mempipe_cache(cache, KVH, D, impl.config.kv_layout)
        for s, n in enumerate(lens):
            slots = block_table[s, torch.arange(n - 1) // BS].long() * BS + \
                torch.arange(n - 1) % BS
            paged.append(ours, slots, torch.randn(n - 1, KVH, D, generator=g),
                         torch.randn(n - 1, KVH, D, generator=g))
    outs = []
    for _ in range(steps):
        meta = builder.build(0, _metadata(block_table, lens))
        x = torch.randn(3, H, D, generator=g)
        for impl, layer, cache in zip(impls, layers, caches):
            k = torch.randn(3, KVH, D, generator=g)
            v = torch.randn(3, KVH, D, generator=g)
            out = torch.full((3, H * D), float("nan"))
            impl.forward(layer, x, k, v, cache, meta, out)
            outs.append(out.clone())
            x = out.view(3, H, D) * 2.0  # the next layer's query follows from this output
        lens = [n + 1 for n in lens]
    return outs, builder, impls


@pytest.mark.skipif(not schemes.has_offload(), reason="no _mempipe.SelectionOffload")
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_vllm_fpga_matches_cpu(monkeypatch, gen, scheme):
    seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
    want, _, _ = _run(monkeypatch, "cpu", scheme, seed)
    got, builder, impls = _run(monkeypatch, "fpga", scheme, seed)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    cfg = impls[0].config
    metrics = builder.plan.offload(cfg, torch.device("cpu")).metrics()
    assert metrics["requests"] > 0 and metrics["fallback_total"] == 0, metrics
    assert impls[0]._layer.plan is builder.plan and impls[1]._layer.plan is builder.plan
    # Known-wrong: another budget gives other outputs (the comparison can fail).
    other, _, _ = _run(monkeypatch, "cpu", scheme, seed, budget=32)
    assert not all(torch.equal(a, b) for a, b in zip(want, other))


def test_vllm_refuses_the_projected_lookahead_query(monkeypatch):
    """lookahead_query=projected (the default) needs the residual stream and the next layer's
    weights, which an attention backend does not see: refused, naming the way out; `same`
    is accepted."""
    monkeypatch.setenv("MEMPIPE_CONFIG", f"placement=cpu,budget=48,page_size={BS},"
                       "lookahead=true")
    with set_current_vllm_config(VllmConfig()):
        with pytest.raises(ValueError, match="set lookahead_query=same"):
            MempipeAttentionImpl(H, D, D ** -0.5, KVH)
        monkeypatch.setenv("MEMPIPE_CONFIG", f"placement=cpu,budget=48,page_size={BS},"
                           "lookahead=true,lookahead_query=same")
        assert MempipeAttentionImpl(H, D, D ** -0.5, KVH).config.lookahead_query == "same"
