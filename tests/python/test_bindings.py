"""Differential tests of the C++ module (mempipe._mempipe) against plain references on fresh
random data, and its argument checking and error mapping."""

import os
import threading
import time

import numpy as np
import pytest
import torch

from mempipe import _mempipe as mp
from mempipe.attention import keys_transposed, layout_view, logical_keys, poisoned_cache
from reference import (ATOL, DTYPES, random_batch, ref_decode, ref_digests, ref_prefill,
                       ref_scores, ref_select, slots_for)

SHAPES = [  # (block_size, kv_heads, num_heads, head_dim)
    (16, 2, 8, 64),
    (32, 1, 4, 128),
    (64, 2, 2, 64),
    (16, 1, 2, 256),
]


# Every host cache layout (config kv_layout); head_kt and page_kt are marked views whose K pages
# are transposed (mempipe.attention.layout_view), read back through logical_keys.
LAYOUTS = ["token", "head", "page", "head_kt", "page_kt"]


def random_lens(gen, block_size, num_seqs=3, max_pages=9):
    return [int(torch.randint(1, max_pages * block_size + 1, (1,), generator=gen))
            for _ in range(num_seqs)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_write_kv_places_rows_and_leaves_other_slots(gen, dtype, shape, layout):
    bs, kvh, _, d = shape
    batch = random_batch(gen, dtype, bs, kvh, d, random_lens(gen, bs), layout=layout)
    logical = torch.stack([logical_keys(batch.kv_cache), batch.kv_cache[1]])
    written = torch.zeros(batch.kv_cache.shape[1:3], dtype=torch.bool)
    for s, n in enumerate(batch.seq_lens.tolist()):
        for t in range(n):
            blk = int(batch.block_table[s, t // bs])
            assert torch.equal(logical[0, blk, t % bs], batch.keys[s][t])
            assert torch.equal(logical[1, blk, t % bs], batch.values[s][t])
            written[blk, t % bs] = True
    assert torch.isnan(logical[:, ~written].float()).all()


def test_write_kv_skips_negative_slots(gen):
    kv = torch.full((2, 4, 16, 1, 64), float("nan"))
    k, v = torch.randn(3, 1, 64, generator=gen), torch.randn(3, 1, 64, generator=gen)
    mp.write_kv(kv, torch.tensor([5, -1, 40]), k, v)
    assert torch.equal(kv[0, 0, 5], k[0]) and torch.equal(kv[1, 2, 8], v[2])
    assert int(torch.isnan(kv).flatten(1).all(1).sum()) == 0
    assert int((~torch.isnan(kv)).sum()) == 2 * 2 * 64


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_write_and_append_read_strided_token_rows(gen, dtype, layout):
    """key and value as vLLM passes them, column slices of one fused qkv row per token, are
    written in place: the cache and digests equal those of the packed copies. Rows whose heads
    are not packed are refused, naming the strides."""
    from mempipe.attention import poisoned_cache
    bs, kvh, d, n, blocks = 16, 2, 64, 37, 6
    qkv = torch.randn(n, (3 + 2) * kvh * d, generator=gen).to(dtype)
    key = qkv[:, 3 * kvh * d:4 * kvh * d].view(n, kvh, d)
    value = qkv[:, 4 * kvh * d:].view(n, kvh, d)
    assert not key.is_contiguous() and key.stride(0) == 5 * kvh * d
    slots = torch.randperm(blocks * bs, generator=gen)[:n]
    slots[4] = -1
    caches = []
    for k, v in ((key.contiguous(), value.contiguous()), (key, value)):
        for call in ("write_kv", "append"):
            kv = poisoned_cache(blocks, bs, kvh, d, dtype, "cpu", layout=layout)
            dg = torch.full((blocks, 2, kvh, d), float("nan"), dtype=dtype)
            if call == "write_kv":
                mp.write_kv(kv, slots, k, v)
            else:
                mp.append_kv_and_digests(kv, slots, k, v, dg)
            caches.append((kv, dg if call == "append" else None))
    for (kv_p, dg_p), (kv_s, dg_s) in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(kv_s, kv_p, equal_nan=True, rtol=0, atol=0)
        if dg_p is not None:
            torch.testing.assert_close(dg_s, dg_p, equal_nan=True, rtol=0, atol=0)
    # The check can fail: the fused rows read as if packed write other values.
    wrong = poisoned_cache(blocks, bs, kvh, d, dtype, "cpu", layout=layout)
    mp.write_kv(wrong, slots, qkv[:, 3 * kvh * d:].reshape(-1, kvh, d)[:n], value)
    assert not torch.equal(torch.nan_to_num(wrong[0]), torch.nan_to_num(caches[0][0][0]))
    # Heads not packed (each head's row stride is not head_dim): refused, with the strides.
    kv = poisoned_cache(blocks, bs, kvh, d, dtype, "cpu", layout=layout)
    spread = qkv[:, :2 * kvh * d].view(n, kvh, 2 * d)[:, :, :d]
    with pytest.raises(ValueError, match=r"has strides \[640, 128, 1\].*packed"):
        mp.write_kv(kv, slots, spread, value)
    with pytest.raises(ValueError, match="has strides"):
        mp.append_kv_and_digests(kv, slots, key, spread,
                                 torch.zeros((blocks, 2, kvh, d), dtype=dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_build_and_append_digests_match_reference(gen, dtype, shape, layout):
    bs, kvh, _, d = shape
    lens = random_lens(gen, bs)
    # Bulk build after writing.
    batch = random_batch(gen, dtype, bs, kvh, d, lens, layout=layout)
    bulk = torch.full((batch.kv_cache.shape[1], 2, kvh, d), float("nan"), dtype=dtype)
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, bulk)
    # Incremental: the same tokens appended one at a time through the fused call.
    inc = torch.full_like(bulk, float("nan"))
    kv2 = poisoned_cache(batch.kv_cache.shape[1], bs, kvh, d, dtype, "cpu", layout)
    for s, n in enumerate(lens):
        for t in range(n):
            slot = slots_for(batch.block_table, s, [t], bs)
            mp.append_kv_and_digests(kv2, slot, batch.keys[s][t:t + 1],
                                     batch.values[s][t:t + 1], inc)
    ref = ref_digests(batch)
    for blk, want in ref.items():
        assert torch.equal(bulk[blk], want), f"bulk digest of block {blk}"
        assert torch.equal(inc[blk], want), f"incremental digest of block {blk}"
    unused = [b for b in range(bulk.shape[0]) if b not in ref]
    assert torch.isnan(bulk[unused].float()).all() and torch.isnan(inc[unused].float()).all()
    torch.testing.assert_close(kv2, batch.kv_cache, equal_nan=True, rtol=0, atol=0)


def _digests(batch):
    dg = torch.full((batch.kv_cache.shape[1], 2) + batch.kv_cache.shape[3:], float("nan"),
                    dtype=batch.kv_cache.dtype)
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg)
    return dg


@pytest.mark.parametrize("aggregation", ["max", "sum"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relevancy_is_bit_exact_with_canonical_order(gen, dtype, shape, aggregation):
    bs, kvh, h, d = shape
    batch = random_batch(gen, dtype, bs, kvh, d, random_lens(gen, bs))
    dg = _digests(batch)
    q = torch.randn(batch.num_seqs, h, d, generator=gen).to(dtype)
    scores = torch.full((batch.num_seqs, kvh, batch.block_table.shape[1]), float("nan"))
    mp.compute_relevancy(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, scores,
                         aggregation=aggregation)
    np.testing.assert_array_equal(scores.numpy(), ref_scores(q, batch, dg, aggregation))


@pytest.mark.parametrize("budget_pages,sinks,locals_", [(4, 1, 1), (6, 2, 2), (3, 0, 1)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_select_pages_matches_reference(gen, shape, budget_pages, sinks, locals_):
    bs, kvh, _, _ = shape
    lens = random_lens(gen, bs, num_seqs=4, max_pages=12)
    max_blocks = max(-(-n // bs) for n in lens) + 1
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    # Coarse scores make ties common, exercising the lower-index tie break.
    scores = torch.randint(0, 6, (len(lens), kvh, max_blocks), generator=gen).float()
    budget = budget_pages * bs
    pages = torch.full((len(lens), kvh, budget_pages + 2), 99, dtype=torch.int32)
    counts = torch.full((len(lens), kvh), 99, dtype=torch.int32)
    mp.select_pages(scores, table, torch.tensor(lens, dtype=torch.int32), bs, pages, counts,
                    budget=budget, sinks=sinks, locals=locals_)
    want = ref_select(scores.numpy(), lens, bs, budget, sinks, locals_)
    for s in range(len(lens)):
        for g in range(kvh):
            c = int(counts[s, g])
            assert pages[s, g, :c].tolist() == want[s][g], (s, g)
            assert (pages[s, g, c:] == -1).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_decode_matches_reference(gen, dtype, shape, threads, layout):
    bs, kvh, h, d = shape
    batch = random_batch(gen, dtype, bs, kvh, d, random_lens(gen, bs), layout=layout)
    q = torch.randn(batch.num_seqs, h, d, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                    num_threads=threads)
    torch.testing.assert_close(out.double(), ref_decode(q, batch, scale), atol=ATOL[dtype],
                               rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_score_select_sparse_decode_pipeline(gen, dtype, shape, threads, layout):
    bs, kvh, h, d = shape
    batch = random_batch(gen, dtype, bs, kvh, d, random_lens(gen, bs, max_pages=14), layout=layout)
    dg = _digests(batch)
    q = torch.randn(batch.num_seqs, h, d, generator=gen).to(dtype)
    budget_pages = 4
    pages = torch.empty(batch.num_seqs, kvh, budget_pages, dtype=torch.int32)
    counts = torch.empty(batch.num_seqs, kvh, dtype=torch.int32)
    mp.score_and_select(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages, counts,
                        budget=budget_pages * bs, sinks=1, locals=1, aggregation="max")
    want = ref_select(ref_scores(q, batch, dg, "max"), batch.seq_lens.tolist(), bs,
                      budget_pages * bs, 1, 1)
    got = [[pages[s, g, :int(counts[s, g])].tolist() for g in range(kvh)]
           for s in range(batch.num_seqs)]
    assert got == want
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, out,
                     scale, num_threads=threads)
    torch.testing.assert_close(out.double(), ref_decode(q, batch, scale, pages=want),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_score_select_decode_is_the_two_calls_in_one(gen, dtype, shape, threads, layout):
    """score_select_decode (steps 2-4 as one host call) writes the selection score_and_select
    writes and the output sparse_decode writes over it, bit for bit, in every cache layout and on
    more threads than (sequence, KV head) rows; the comparison rejects an output with one head's
    last page dropped."""
    bs, kvh, h, d = shape
    batch = random_batch(gen, dtype, bs, kvh, d, random_lens(gen, bs, max_pages=14), layout=layout)
    dg = _digests(batch)
    q = torch.randn(batch.num_seqs, h, d, generator=gen).to(dtype)
    budget_pages, scale = 4, d ** -0.5
    shape3 = (batch.num_seqs, kvh, budget_pages)

    def buffers():
        return (torch.full(shape3, 77, dtype=torch.int32),
                torch.full(shape3[:2], 77, dtype=torch.int32), torch.full_like(q, float("nan")))

    pages, counts, out = buffers()
    mp.score_and_select(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages, counts,
                        budget=budget_pages * bs, num_threads=threads)
    mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, out,
                     scale, num_threads=threads)
    pages1, counts1, out1 = buffers()
    mp.score_select_decode(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages1,
                           counts1, out1, scale, budget=budget_pages * bs, num_threads=threads)
    assert torch.equal(pages1, pages) and torch.equal(counts1, counts)
    assert not out1.isnan().any()
    bits = {4: torch.int32, 2: torch.int16}[out.element_size()]
    assert torch.equal(out1.view(bits), out.view(bits))
    s = int(torch.argmax(counts[:, 0]))  # a head with the most pages
    if int(counts[s, 0]) > 1:
        dropped = counts.clone()
        dropped[s, 0] -= 1
        wrong = torch.full_like(q, float("nan"))
        mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, dropped,
                         wrong, scale)
        assert not torch.equal(wrong, out1)


def test_score_select_decode_names_a_bad_budget(gen):
    batch = random_batch(gen, torch.float32, 16, 2, 64, [40, 70])
    q = torch.randn(batch.num_seqs, 4, 64, generator=gen)
    pages = torch.empty(batch.num_seqs, 2, 4, dtype=torch.int32)
    counts = torch.empty(batch.num_seqs, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="budget must be a positive multiple of the page size 16 "
                                         "tokens, got 50"):
        mp.score_select_decode(q, batch.kv_cache, _digests(batch), batch.block_table,
                               batch.seq_lens, pages, counts, torch.empty_like(q), 0.125,
                               budget=50)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prefill_attention_matches_reference(gen, dtype, shape, threads, layout):
    bs, kvh, h, d = shape
    lens = random_lens(gen, bs, max_pages=4)
    batch = random_batch(gen, dtype, bs, kvh, d, lens, layout=layout)
    q_lens = [int(torch.randint(1, n + 1, (1,), generator=gen)) for n in lens]
    starts = torch.tensor([0] + list(np.cumsum(q_lens)), dtype=torch.int32)
    q = torch.randn(int(starts[-1]), h, d, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    mp.prefill_attention(q, starts, batch.kv_cache, batch.block_table, batch.seq_lens, out,
                         scale, num_threads=threads)
    torch.testing.assert_close(out.double(), ref_prefill(q, starts, batch, scale),
                               atol=ATOL[dtype], rtol=0)


def test_numpy_arrays_are_accepted_without_copies(gen):
    batch = random_batch(gen, torch.float32, 16, 1, 64, [40])
    kv = batch.kv_cache.numpy()  # shares memory with the torch tensor
    q = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).standard_normal(
        (1, 2, 64)).astype(np.float32)
    out = np.full_like(q, np.nan)
    mp.dense_decode(q, kv, batch.block_table.numpy(), batch.seq_lens.numpy(), out, 0.125)
    want = ref_decode(torch.from_numpy(q), batch, 0.125)
    np.testing.assert_allclose(out, want.numpy(), atol=2e-5, rtol=0)


def test_outputs_are_written_in_place_in_a_view(gen):
    batch = random_batch(gen, torch.float32, 16, 1, 64, [33, 7])
    q = torch.randn(2, 2, 64, generator=gen)
    big = torch.full((4, 2, 64), float("nan"))
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, big[1:3], 0.125)
    assert torch.isnan(big[0]).all() and torch.isnan(big[3]).all()
    torch.testing.assert_close(big[1:3].double(), ref_decode(q, batch, 0.125), atol=2e-5, rtol=0)


# ---- errors: Status -> Python exception, message intact ----------------------------------------

def _small(gen):
    batch = random_batch(gen, torch.float32, 16, 2, 64, [40, 20])
    q = torch.randn(2, 4, 64, generator=gen)
    return batch, q


def test_invalid_budget_raises_value_error_with_core_message(gen):
    batch, q = _small(gen)
    dg = _digests(batch)
    pages = torch.empty(2, 2, 4, dtype=torch.int32)
    counts = torch.empty(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"budget must be a positive multiple of the page size "
                                         r"16 tokens, got 24"):
        mp.score_and_select(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages,
                            counts, budget=24)


def test_slot_past_cache_is_rejected(gen):
    kv = torch.zeros(2, 2, 16, 1, 64)
    with pytest.raises(ValueError, match="slot"):
        mp.write_kv(kv, torch.tensor([32]), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64))


def test_unsupported_block_size_is_named(gen):
    kv = torch.zeros(2, 2, 48, 1, 64)
    with pytest.raises(ValueError, match="48"):
        mp.write_kv(kv, torch.tensor([0]), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64))


def test_non_contiguous_tensor_is_rejected(gen):
    batch, q = _small(gen)
    q_strided = torch.randn(2, 64, 4, generator=gen).transpose(1, 2)
    with pytest.raises(ValueError, match=r"query \(cpu:0, float32, shape \[2, 4, 64\]\) must be C-contiguous"):
        mp.dense_decode(q_strided, batch.kv_cache, batch.block_table, batch.seq_lens,
                        torch.empty(2, 4, 64), 0.1)


@pytest.mark.parametrize("layout", ["head", "page"])
def test_head_and_page_major_caches_are_read_as_such(gen, layout):
    """The head- or page-major view and a token-major copy of the same logical cache decode to
    the same bits; the memory relabelled as token-major (its bytes in a contiguous tensor of the
    token-major shape) decodes to something else, so the strides are what is read."""
    batch = random_batch(gen, torch.float32, 16, 2, 64, [70, 33], layout=layout)
    assert not batch.kv_cache.is_contiguous()
    q = torch.randn(2, 4, 64, generator=gen)
    outs = []
    memory = batch.kv_cache.as_strided((batch.kv_cache.numel(),), (1,))
    relabelled = memory.clone().view(batch.kv_cache.shape)
    for kv in (batch.kv_cache, batch.kv_cache.contiguous(), relabelled):
        out = torch.full_like(q, float("nan"))
        mp.dense_decode(q, kv, batch.block_table, batch.seq_lens, out, 0.125)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2], atol=1e-2)


@pytest.mark.parametrize("layout", ["head_kt", "page_kt"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_transposed_key_pages_are_read_by_the_mark(gen, dtype, layout):
    """A head_kt / page_kt view decodes (dense and sparse) to what the same logical cache in
    head- or page-major memory does, within the kernels' summation order. Its memory read
    without the mark (a fresh view of the same bytes, the K pages taken for rows) decodes to
    something else, so the mark is what is read; K pages are stored [D / x, page, x] exactly.
    A mark on a token-major view is refused, naming it."""
    base = layout.removesuffix("_kt")
    lens = [70, 33]
    kt = random_batch(torch.Generator().manual_seed(5), dtype, 16, 2, 64, lens, layout=layout)
    plain = random_batch(torch.Generator().manual_seed(5), dtype, 16, 2, 64, lens, layout=base)
    assert keys_transposed(kt.kv_cache) and not keys_transposed(plain.kv_cache)
    assert torch.equal(kt.block_table, plain.block_table)
    # The bytes: K page (block b, head h) is [64 / x, 16, x] of head- or page-major's rows.
    x = 4 // kt.kv_cache.element_size()
    blk = int(kt.block_table[0, 0])
    page = logical_keys(plain.kv_cache)[blk, :, 1]                          # [16, 64]
    raw = kt.kv_cache[0, blk, :, 1]                                         # the same 1024 slots
    want = page.reshape(16, 64 // x, x).transpose(0, 1).reshape(16, 64)     # [D/x, 16, x] flat
    assert torch.equal(raw.contiguous().view(-1), want.contiguous().view(-1))
    q = torch.randn(2, 4, 64, generator=gen).to(dtype)
    pages = torch.tensor([[[0, 2, -1], [1, 3, 4]], [[0, 1, -1], [2, -1, -1]]], dtype=torch.int32)
    counts = torch.tensor([[2, 3], [2, 1]], dtype=torch.int32)
    outs = {}
    region = kt.kv_cache.as_strided((kt.kv_cache.numel(),), (1,))
    unmarked = layout_view(region, kt.kv_cache.shape[1], 16, 2, 64, base)
    for name, kv in (("kt", kt.kv_cache), ("plain", plain.kv_cache), ("unmarked", unmarked)):
        for sparse in (False, True):
            out = torch.full_like(q, float("nan"))
            if sparse:
                mp.sparse_decode(q, kv, kt.block_table, kt.seq_lens, pages, counts, out, 0.125)
            else:
                mp.dense_decode(q, kv, kt.block_table, kt.seq_lens, out, 0.125)
            outs[name, sparse] = out.float()
    # The transposed scores sum the channels in another order: fp32 rounding apart, so a 16-bit
    # output may round one unit differently (2^-8 relative, 2^-7 with margin), fp32 by a few
    # units of 2^-24. A K page read as rows instead changes the weights by O(1).
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2.0**-7, 1e-3)
    for sparse in (False, True):
        assert torch.isfinite(outs["kt", sparse]).all()
        torch.testing.assert_close(outs["kt", sparse], outs["plain", sparse], rtol=rtol,
                                   atol=atol)
        assert (outs["unmarked", sparse] - outs["plain", sparse]).abs().max() > 0.05
    token = random_batch(gen, dtype, 16, 2, 64, lens, layout="token").kv_cache
    setattr(token, "_mempipe_keys_transposed", True)
    with pytest.raises(ValueError, match="marked _mempipe_keys_transposed but has strides"):
        mp.dense_decode(q, token, kt.block_table, kt.seq_lens, torch.empty_like(q), 0.125)


def test_other_cache_strides_are_refused_naming_them(gen):
    batch, q = _small(gen)
    bad = batch.kv_cache.transpose(3, 4).contiguous().transpose(3, 4)  # D not innermost
    with pytest.raises(ValueError, match=r"kv_cache \(cpu:0, float32, shape \[2, .*\]\) has "
                       r"strides \[.*\]; expected a C-contiguous tensor \(token-major\) or"):
        mp.dense_decode(q, bad, batch.block_table, batch.seq_lens, torch.empty_like(q), 0.1)


def test_wrong_dtype_and_shape_are_named(gen):
    batch, q = _small(gen)
    with pytest.raises(ValueError, match=r"block_table \(cpu:0, int64, shape \[2, \d+\]\) must be int32"):
        mp.dense_decode(q, batch.kv_cache, batch.block_table.long(), batch.seq_lens,
                        torch.empty_like(q), 0.1)
    with pytest.raises(ValueError, match=r"out \(cpu:0, float32, shape \[2, 3, 64\]\): dimension 1 "
                       r"\(the query's size\) must be 4"):
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens,
                        torch.empty(2, 3, 64), 0.1)
    with pytest.raises(ValueError, match=r"kv_cache \(cpu:0, float32, shape \[.*\]\) must have 5 dimensions"):
        mp.dense_decode(q, batch.kv_cache[0], batch.block_table, batch.seq_lens,
                        torch.empty_like(q), 0.1)


def test_block_id_out_of_range_is_rejected(gen):
    batch, q = _small(gen)
    bad = batch.block_table.clone()
    bad[0, 0] = 1000
    with pytest.raises(ValueError, match="1000"):
        mp.dense_decode(q, batch.kv_cache, bad, batch.seq_lens, torch.empty_like(q), 0.1)


def test_build_reports_its_devices():
    import mempipe
    assert mempipe.devices[0] == "cpu"
    assert set(mempipe.devices) <= {"cpu", "cuda"}
    assert mp.gpu == ("cuda" in mempipe.devices)


def test_unknown_stream_argument_is_rejected_on_cpu_only_when_gpu(gen):
    """Host tensors ignore `stream=`; the GPU sizes need a GPU build."""
    batch, q = _small(gen)
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, torch.empty_like(q),
                    0.1, stream=None)
    if not mp.gpu:
        with pytest.raises(NotImplementedError, match="no GPU kernels"):
            mp.decode_workspace_bytes(1, 32, 8, 64)


def test_non_tensor_argument_is_rejected():
    with pytest.raises(ValueError, match=r"kv_cache must be a tensor or array with __dlpack__"):
        mp.write_kv([1, 2], torch.zeros(1, dtype=torch.int64), torch.zeros(1), torch.zeros(1))


def test_non_finite_query_is_rejected(gen):
    batch, q = _small(gen)
    q[1, 2, 5] = float("inf")
    pages = torch.empty(2, 2, 4, dtype=torch.int32)
    counts = torch.empty(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError):
        mp.score_and_select(q, batch.kv_cache, _digests(batch), batch.block_table,
                            batch.seq_lens, pages, counts, budget=64)


def test_long_calls_release_the_gil(gen):
    """While one thread runs a long dense decode, this thread keeps running Python."""
    # 256 query heads share one KV head of 38400 tokens (4 sequences, 79 MB): one call takes
    # 0.1-0.2 s on the build VM, an order of magnitude above the few-ms scheduling stalls a
    # loaded 2-core machine shows (a 13 ms call, the size this test used to have once decode
    # got faster, flaked at an 8 ms stall).
    batch = random_batch(gen, torch.float32, 64, 1, 64, [64 * 600] * 4, spare_blocks=0)
    q = torch.randn(4, 256, 64, generator=gen)
    out = torch.empty_like(q)
    one_call = float("inf")
    for _ in range(2):  # the faster of two: the first also faults the output pages in
        start = time.perf_counter()
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, 0.125)
        one_call = min(one_call, time.perf_counter() - start)
    reps = max(1, int(0.6 / max(one_call, 1e-3)))

    def work():
        for _ in range(reps):
            mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, 0.125)

    t = threading.Thread(target=work)
    last, max_gap = time.perf_counter(), 0.0
    t.start()
    while t.is_alive():
        now = time.perf_counter()
        max_gap, last = max(max_gap, now - last), now
    t.join()
    print(f"one call {one_call:.3f} s; longest stall of the Python thread {max_gap:.4f} s")
    # Holding the GIL would stall this loop for a whole call; scheduling noise on a loaded
    # machine stays well below half of one.
    assert max_gap < one_call / 2, (max_gap, one_call)


def test_cpu_description_names_the_family_and_model_the_kernel_reports():
    """Benchmarks record the CPU with mp.cpu_description(): brand, x86 family and model (a brand
    such as "AMD EPYC" names no generation), logical CPUs; the numbers are /proc/cpuinfo's."""
    d = mp.cpu_description()
    assert d.endswith(f", {os.cpu_count()} logical CPUs"), d
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    info = {k.strip(): v.strip() for k, v in info.items()}
    if "cpu family" not in info or "model" not in info:
        pytest.skip("no x86 family / model in /proc/cpuinfo")
    assert f"(x86 family {info['cpu family']} model {info['model']})" in d, (d, info)
