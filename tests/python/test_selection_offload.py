"""The selection-offload binding (mempipe._mempipe.SelectionOffload, backend/selection_offload.h)
and the when_zero= / when_nonzero= switches of the step functions, on fresh random data (seed
printed), outputs poisoned.

CPU tensors run the engine's CPU mode (here and in CI); CUDA tensors its stream-ordered GPU side
(the `cuda` fixture: skipped without a GPU or a GPU build, failed under MEMPIPE_REQUIRE_GPU=1):
bit-identical to the GPU's own selector, a step captured into a CUDA graph, and the device-side
fallback when the card is late. `test_checks_reject_known_wrong_answers` shows the comparisons
fail a wrong selection and an untouched output.
"""

import math

import pytest
import torch

from mempipe import _mempipe as mp
from reference import random_batch, slots_for

PAGE = 16
POISON = -7


def make_batch(gen, dtype=torch.bfloat16, kvh=2, head_dim=64, lens=(700, 333, 97)):
    return random_batch(gen, dtype, PAGE, kvh, head_dim, list(lens))


def digests_of(batch):
    kv = batch.kv_cache
    dg = torch.empty(kv.shape[1], 2, kv.shape[3], kv.shape[4], dtype=kv.dtype)
    mp.build_digests(kv, batch.block_table, batch.seq_lens, dg)
    return dg


def reference_selection(batch, dg, query, budget, max_sel, aggregation="max"):
    """The CPU selector's pages/counts, rows padded with -1 past k (as the offload writes)."""
    s, kvh = batch.num_seqs, batch.kv_cache.shape[3]
    pages = torch.full((s, kvh, max_sel), -1, dtype=torch.int32)
    counts = torch.zeros(s, kvh, dtype=torch.int32)
    k = budget // PAGE
    p_k = torch.full((s, kvh, k), POISON, dtype=torch.int32)
    mp.score_and_select(query, batch.kv_cache, dg, batch.block_table, batch.seq_lens, p_k, counts,
                        budget=budget, aggregation=aggregation)
    pages[:, :, :k] = p_k
    return pages, counts


def poisoned(s, kvh, max_sel, device="cpu"):
    return (torch.full((s, kvh, max_sel), POISON, dtype=torch.int32, device=device),
            torch.full((s, kvh), POISON, dtype=torch.int32, device=device),
            torch.full((1,), -1, dtype=torch.int32, device=device))


def test_checks_reject_known_wrong_answers(gen):
    batch = make_batch(gen)
    dg = digests_of(batch)
    q = torch.randn(batch.num_seqs, 8, 64, generator=gen).to(torch.bfloat16)
    pages, counts = reference_selection(batch, dg, q, 128, 10)
    wrong = pages.clone()
    wrong[1, 0, 3] += 1
    assert not torch.equal(wrong, pages)
    p, c, _ = poisoned(batch.num_seqs, 2, 10)
    assert not torch.equal(p, pages) and not torch.equal(c, counts)


@pytest.mark.parametrize("functional", ["reference", "hls"])
@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_cpu_offload_is_bit_identical_to_the_cpu_selector(gen, functional, aggregation):
    batch = make_batch(gen)
    dg = digests_of(batch)
    off = mp.SelectionOffload(device="cpu", functional=functional, paced=False, slots=4,
                              deadline_ms=5000.0, threads=2)
    assert off.device == "cpu" and off.functional == functional and off.slots == 4
    off.add_layer(5, batch.kv_cache)
    off.build_digests(5, batch.kv_cache, batch.block_table, batch.seq_lens)
    queries = [torch.randn(batch.num_seqs, 8, 64, generator=gen).to(torch.bfloat16)
               for _ in range(4)]
    for slot, q in enumerate(queries):
        off.submit(slot, 5, q, batch.block_table, batch.seq_lens, budget=128,
                   aggregation=aggregation)
    for slot in reversed(range(4)):
        pages, counts, status = poisoned(batch.num_seqs, 2, 10)
        off.wait(slot, pages, counts, status)
        assert int(status[0]) == 0
        want_p, want_c = reference_selection(batch, dg, queries[slot], 128, 10, aggregation)
        assert torch.equal(pages, want_p), f"slot {slot}"
        assert torch.equal(counts, want_c), f"slot {slot}"
    m = off.metrics()
    assert m["requests"] == 4 and m["waited"]["selected"] == 4 and m["fallback_total"] == 0
    assert m["functional"] == functional and m["selector"] == "fpga-u55c-emulated"
    assert m["modeled_device_ms"] > 0 and m["modeled_bytes_to_card"] > 0
    off.reset_metrics()
    assert off.metrics()["requests"] == 0
    off.shutdown()


def test_cpu_offload_appended_keys_reach_the_card(gen):
    batch = make_batch(gen, dtype=torch.float32)
    dg = digests_of(batch)
    off = mp.SelectionOffload(device="cpu", paced=True, deadline_ms=5000.0)
    off.add_layer(0, batch.kv_cache)
    off.build_digests(0, batch.kv_cache, batch.block_table, batch.seq_lens)
    # Large new keys at each sequence's newest token: its page's digest changes.
    slots = torch.cat([slots_for(batch.block_table, s, [int(batch.seq_lens[s]) - 1], PAGE)
                       for s in range(batch.num_seqs)])
    key = 8 * torch.randn(batch.num_seqs, 2, 64, generator=gen)
    value = torch.randn(batch.num_seqs, 2, 64, generator=gen)
    mp.append_kv_and_digests(batch.kv_cache, slots, key, value, dg)
    off.append(0, slots, key)
    q = torch.randn(batch.num_seqs, 8, 64, generator=gen)
    off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=64)
    pages, counts, status = poisoned(batch.num_seqs, 2, 4)
    off.wait(0, pages, counts, status)
    assert int(status[0]) == 0
    want_p, want_c = reference_selection(batch, dg, q, 64, 4)
    assert torch.equal(pages, want_p) and torch.equal(counts, want_c)
    m = off.metrics()
    assert m["appends"] == 1 and m["appended_tokens"] == batch.num_seqs


def test_cpu_offload_late_card_is_a_counted_timeout_and_leaves_buffers_alone(gen):
    batch = make_batch(gen)
    # HBM 10^4 times slower than the model's default: each selection takes tens of ms (modeled,
    # paced) and misses a 5 ms deadline.
    off = mp.SelectionOffload(device="cpu", paced=True, deadline_ms=5.0, dead_after_failures=2,
                              params={"hbm_channel_peak_bps": 14.375e9 / 1e4})
    off.add_layer(0, batch.kv_cache)
    off.build_digests(0, batch.kv_cache, batch.block_table, batch.seq_lens)
    q = torch.randn(batch.num_seqs, 8, 64, generator=gen).to(torch.bfloat16)
    reasons = []
    for _ in range(3):
        off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=128)
        pages, counts, status = poisoned(batch.num_seqs, 2, 8)
        off.wait(0, pages, counts, status)
        reasons.append(mp.offload_reasons[int(status[0])])
        assert (pages == POISON).all() and (counts == POISON).all()
    # Two timeouts declare the card dead; the third request fails fast (or is refused as busy
    # while the late one still holds the slot's inputs).
    assert reasons[:2] == ["timeout", "timeout"]
    assert reasons[2] in ("dead", "busy", "timeout")
    m = off.metrics()
    assert m["fallbacks"]["timeout"] >= 2 and m["fallback_total"] == 3
    off.shutdown()
    assert off.metrics()["dead"]


def test_when_switches_on_cpu_tensors(gen):
    batch = make_batch(gen, dtype=torch.float32)
    s, h, d = batch.num_seqs, 8, 64
    q = torch.randn(s, h, d, generator=gen)
    scale = 1 / math.sqrt(d)
    zero, one = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    out = torch.full((s, h, d), float("nan"))
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                    when_nonzero=zero)
    assert torch.isnan(out).all(), "a call whose switch does not hold must not run"
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                    when_nonzero=one)
    want = torch.full((s, h, d), float("nan"))
    mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, want, scale)
    assert torch.equal(out, want)
    dg = digests_of(batch)
    pages, counts, _ = poisoned(s, 2, 4)
    mp.score_and_select(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages, counts,
                        budget=64, when_zero=one)
    assert (pages == POISON).all()
    mp.score_and_select(q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, pages, counts,
                        budget=64, when_zero=zero)
    assert not (pages == POISON).any()
    sparse = torch.full((s, h, d), float("nan"))
    mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, sparse,
                     scale, when_zero=one)
    assert torch.isnan(sparse).all()
    mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, sparse,
                     scale, when_zero=zero)
    assert not torch.isnan(sparse).any()
    with pytest.raises(ValueError, match="not both"):
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                        when_zero=zero, when_nonzero=one)
    with pytest.raises(ValueError, match="exactly one"):
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                        when_zero=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="when_zero"):
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                        when_zero=torch.zeros(1, dtype=torch.int64))


def test_bad_input_is_named(gen):
    batch = make_batch(gen)
    with pytest.raises(ValueError, match="'tpu'"):
        mp.SelectionOffload(device="tpu")
    with pytest.raises(ValueError, match="'rtl'"):
        mp.SelectionOffload(functional="rtl")
    with pytest.raises(ValueError, match="'fpga9'"):
        mp.SelectionOffload(fpga_backend="fpga9")
    with pytest.raises(ValueError, match="'hbm_gbps'"):
        mp.SelectionOffload(params={"hbm_gbps": 1.0})
    with pytest.raises(ValueError, match="got 0"):
        mp.SelectionOffload(slots=0)
    with pytest.raises(ValueError, match="got -3"):
        mp.SelectionOffload(deadline_ms=-3.0)
    with pytest.raises(ValueError, match="append_ring must be in \\[1, 1024\\], got 0"):
        mp.SelectionOffload(append_ring=0)
    with pytest.raises(ValueError, match="append_timeout_ms must be > 0, got -1"):
        mp.SelectionOffload(append_timeout_ms=-1.0)
    ring = mp.SelectionOffload(append_ring=3).metrics()
    assert ring["append_ring"] == 3 and ring["late_timeouts"] == 0
    assert mp.SelectionOffload().metrics()["append_ring"] == 8
    off = mp.SelectionOffload(slots=2)
    off.add_layer(0, batch.kv_cache)
    q = torch.randn(batch.num_seqs, 8, 64, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="got 2"):
        off.submit(2, 0, q, batch.block_table, batch.seq_lens, budget=128)
    with pytest.raises(ValueError, match="layer 4"):
        off.submit(0, 4, q, batch.block_table, batch.seq_lens, budget=128)
    with pytest.raises(ValueError, match="fp32"):
        off.submit(0, 0, q.float(), batch.block_table, batch.seq_lens, budget=128)
    with pytest.raises(ValueError, match="100"):
        off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=100)
    pages, counts, status = poisoned(batch.num_seqs, 2, 8)
    with pytest.raises(ValueError, match="no submitted request"):
        off.wait(0, pages, counts, status)
    off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=128)
    with pytest.raises(ValueError, match="not waited for"):
        off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=128)
    with pytest.raises(ValueError, match="status"):
        off.wait(0, pages, counts, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="key"):
        off.append(0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 2, 64))
    off.shutdown()


# ---- CUDA ----------------------------------------------------------------------------------


def gpu_selection(batch, dg, q, budget, max_sel, dev):
    s, kvh = batch.num_seqs, batch.kv_cache.shape[3]
    pages = torch.full((s, kvh, max_sel), -1, dtype=torch.int32, device=dev)
    counts = torch.full((s, kvh), POISON, dtype=torch.int32, device=dev)
    ws = torch.empty(max(mp.select_workspace_bytes(s, kvh, batch.block_table.shape[1]), 1),
                     dtype=torch.uint8, device=dev)
    mp.score_and_select(q, batch.kv_cache.to(dev), dg, batch.block_table.to(dev),
                        batch.seq_lens.to(dev), pages, counts, budget=budget, workspace=ws)
    return pages, counts


def test_cuda_offload_matches_the_gpu_selector_and_captures_into_a_graph(gen, cuda):
    batch = make_batch(gen, head_dim=128)
    kv, bt, lens = (t.to(cuda) for t in (batch.kv_cache, batch.block_table, batch.seq_lens))
    dg = digests_of(batch).to(cuda)
    off = mp.SelectionOffload(device=f"cuda:{cuda.index or 0}", paced=True, deadline_ms=2000.0,
                              slots=4)
    off.add_layer(0, kv)
    off.build_digests(0, kv, bt, lens)
    q = torch.randn(batch.num_seqs, 8, 128, generator=gen).to(torch.bfloat16).to(cuda)
    pages, counts, status = poisoned(batch.num_seqs, 2, 18, cuda)
    # Warm-up (uncaptured): sizes the slot's pinned staging.
    off.submit(1, 0, q, bt, lens, budget=256)
    off.wait(1, pages, counts, status)
    torch.cuda.synchronize()
    assert int(status.item()) == 0
    want_p, want_c = gpu_selection(batch, dg, q, 256, 18, cuda)
    assert torch.equal(pages, want_p) and torch.equal(counts, want_c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        off.submit(1, 0, q, bt, lens, budget=256)
        off.wait(1, pages, counts, status)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        pages.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        assert int(status.item()) == 0
        want_p, want_c = gpu_selection(batch, dg, q, 256, 18, cuda)
        assert torch.equal(pages, want_p) and torch.equal(counts, want_c)
    m = off.metrics()
    assert m["waited"]["selected"] == 4 and m["bytes_d2h"] > 0 and m["bytes_h2d"] > 0
    assert m["gpu_wait_ms"] > 0
    off.shutdown()


def test_cuda_late_card_falls_back_on_the_device(gen, cuda):
    batch = make_batch(gen, head_dim=128)
    kv, bt, lens = (t.to(cuda) for t in (batch.kv_cache, batch.block_table, batch.seq_lens))
    off = mp.SelectionOffload(device="cuda", paced=True, deadline_ms=5.0, dead_after_failures=50,
                              params={"hbm_channel_peak_bps": 14.375e9 / 1e4})
    off.add_layer(0, kv)
    off.build_digests(0, kv, bt, lens)
    s, h, d = batch.num_seqs, 8, 128
    q = torch.randn(s, h, d, generator=gen).to(torch.bfloat16).to(cuda)
    pages, counts, status = poisoned(s, 2, 16, cuda)
    off.submit(0, 0, q, bt, lens, budget=256)
    off.wait(0, pages, counts, status)
    scale = 1 / math.sqrt(d)
    ws = torch.empty(max(mp.decode_workspace_bytes(s, h, 2, bt.shape[1]), 1), dtype=torch.uint8,
                     device=cuda)
    sparse = torch.full((s, h, d), float("nan"), dtype=torch.bfloat16, device=cuda)
    dense = sparse.clone()
    mp.sparse_decode(q, kv, bt, lens, pages, counts, sparse, scale, workspace=ws,
                     when_zero=status)
    mp.dense_decode(q, kv, bt, lens, dense, scale, workspace=ws, when_nonzero=status)
    torch.cuda.synchronize()
    assert mp.offload_reasons[int(status.item())] == "timeout"
    assert torch.isnan(sparse).all(), "the sparse decode ran on a failed selection"
    want = torch.full_like(dense, float("nan"))
    mp.dense_decode(q, kv, bt, lens, want, scale, workspace=ws)
    assert torch.equal(dense, want)
    assert off.metrics()["fallbacks"]["timeout"] == 1
    off.shutdown()
