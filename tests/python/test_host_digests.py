"""Host digests of a serving layer: zeros from an anonymous mapping (mempipe.digests.empty,
poison=False), written by appends only where blocks are used, and equal to the reference after
prompts appended in one call (the fused append's runs of consecutive slots) and decode tokens."""

from __future__ import annotations

import gc

import pytest
import torch

from mempipe import digests as mdg
from mempipe.attention import DecodePlan, PagedLayer, poisoned_cache
from mempipe.config import MempipeConfig
from reference import random_batch, ref_decode, ref_digests, ref_scores, ref_select, slots_for

PAGE = 32
LENS = [70, 256, 33, 1]  # part pages, whole pages, and a one-token sequence


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("digest_dtype", ["native", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unpoisoned_host_digests_are_zeros_that_cost_no_memory_until_written(dtype, digest_dtype):
    mib = 1 << 20
    # 4096 blocks x 2 x 8 KV heads x 128 channels: 32 MiB of bf16 exact digests (64 fp32).
    num_blocks, kvh, d = 4096, 8, 128
    before = _rss_bytes()
    dg = mdg.empty(num_blocks, kvh, d, dtype, "cpu", digest_dtype, poison=False)
    exact = dg if digest_dtype == "native" else dg.exact
    size = exact.numel() * exact.element_size()
    assert exact.shape == (num_blocks, 2, kvh, d) and exact.dtype == dtype
    grown = _rss_bytes() - before
    assert grown < size // 4, f"allocating {size // mib} MiB of digests touched {grown // mib} MiB"
    # Writing one block touches about one page, and the memory outlives every other reference.
    exact[17].fill_(3.0)
    if digest_dtype == "int8":
        dg.codes[17].fill_(5)
        dg.scales[17].fill_(0.5)
    tensors = [exact] if digest_dtype == "native" else [dg.codes, dg.scales, dg.exact]
    del dg, exact
    gc.collect()
    assert _rss_bytes() - before < size // 4
    for t in tensors:
        assert t[17].ne(0).all() and not t[:17].any() and not t[18:].any()
        assert not t.is_cuda
    # The check can fail: the same mapping written in full, as poisoning writes it, is resident.
    # (Poisoned digests from torch.full may reuse memory the process already holds, so they
    # need not raise RSS; a fresh mapping's pages are new.)
    before = _rss_bytes()
    written = mdg.empty(num_blocks, kvh, d, dtype, "cpu", digest_dtype, poison=False)
    mdg.poison_(written)
    full = written if digest_dtype == "native" else written.exact
    assert full.isnan().all()
    assert _rss_bytes() - before >= size * 9 // 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["token", "head", "page", "head_kt", "page_kt"])
def test_paged_layer_host_digests_after_prompts_and_decode(gen, dtype, layout):
    """A sparse PagedLayer on host tensors: prompts appended one call each (as a prefill step),
    then decode tokens one per sequence per call; its digests equal the reference max/min of
    every used page, unused blocks stay zero, and the sparse output equals float64 attention
    over the reference selection."""
    kvh, group, d = 3, 3, 64
    budget = 2 * PAGE
    cfg = MempipeConfig(placement="cpu", budget=budget, page_size=PAGE, dense_layers=0)
    assert cfg.validate() == []
    layer = PagedLayer(cfg, 0, kvh * group, kvh, d, d ** -0.5, plan=DecodePlan())
    batch = random_batch(gen, dtype, PAGE, kvh, d, LENS, layout=layout)
    kv = poisoned_cache(batch.kv_cache.shape[1], PAGE, kvh, d, dtype, "cpu", layout)
    assert kv.stride() == batch.kv_cache.stride()
    prompt = [n - 2 if n > 2 else n for n in LENS]  # the last two tokens come as decode steps
    for s, n in enumerate(prompt):
        layer.append(kv, slots_for(batch.block_table, s, range(n), PAGE), batch.keys[s][:n],
                     batch.values[s][:n])
    for pos in range(min(prompt), max(LENS)):
        rows = [s for s, n in enumerate(LENS) if prompt[s] <= pos < n]
        if not rows:
            continue
        slots = torch.cat([slots_for(batch.block_table, s, [pos], PAGE) for s in rows])
        layer.append(kv, slots, torch.stack([batch.keys[s][pos] for s in rows]),
                     torch.stack([batch.values[s][pos] for s in rows]))
    dg = layer.digests(kv)
    ref = ref_digests(batch)
    for block, want in ref.items():
        assert torch.equal(dg[block], want), f"block {block}"
    unused = [b for b in range(kv.shape[1]) if b not in ref]
    assert unused and not dg[unused].any(), "an unused block's digest was written"
    q = torch.randn(len(LENS), kvh * group, d, generator=gen).to(dtype)
    want = ref_select(ref_scores(q.float(), batch, dg.float(), "max"), LENS, PAGE, budget, 1, 1)
    out = torch.full_like(q, float("nan"))
    layer.decode(q, kv, batch.block_table, batch.seq_lens, out)
    assert layer.calls["sparse"] == 1
    ref_out = ref_decode(q, batch, layer.scale, pages=want)
    err = float((out.double() - ref_out).abs().max())
    # The output's rounding in the storage dtype plus fp32 accumulation over L tokens and D
    # channels.
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    vmax = max(float(v.abs().max()) for v in batch.values)
    tol = u * float(ref_out.abs().max()) + u * vmax + 4 * (max(LENS) + d) * 2.0**-24 * vmax
    assert err <= tol, f"sparse output off the reference selection's by {err:.3e} > {tol:.3e}"
