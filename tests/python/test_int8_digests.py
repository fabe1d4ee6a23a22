"""int8 page digests from Python (MEMPIPE_CONFIG digest_dtype=int8; mempipe.digests,
retriever/int8_quant.h), on fresh random data (seed printed), unwritten digest blocks poisoned.

The reference is independent of the C++ code: `ref_quantize` restates int8_quant.h in numpy
float32 (IEEE round-to-nearest, like the C++), from the exact max/min of reference.ref_digests;
scores and selections come from reference.ref_scores / ref_select over its dequantized rows.
Checked, on the CPU and (the `cuda` fixture: skipped without a GPU or a GPU build, failed under
MEMPIPE_REQUIRE_GPU=1) on CUDA tensors:
  * the module's codes, scales and exact rows equal the reference bit for bit, built in bulk and
    appended in random chunks (the two equal each other too, and untouched blocks stay poisoned);
  * compute_relevancy's scores equal the reference's bit for bit, score_and_select's pages the
    reference selection, through the module, the torch operators and PagedLayer (whose sparse
    output is checked against float64 attention over the reference pages);
  * the bound holds: every key's channel lies inside the dequantized [min, max] and the bound
    scored for a query is >= the exact max of q.k over the page's keys;
  * the `fpga` placement's card with int8 layers selects the same pages;
  * the transformers adapter at a budget covering the context generates native's tokens.
`test_checks_reject_known_wrong_answers` shows the comparisons fail wrong answers: max rounded
down, min rounded up, the native digests' scores in place of the int8 ones, and a moved page.
"""

import math

import numpy as np
import pytest
import torch

from mempipe import _mempipe as mp
from mempipe import digests as mdg
from mempipe.attention import DecodePlan, PagedLayer, logical_keys
from mempipe.config import MempipeConfig
from reference import (random_batch, ref_decode, ref_digests, ref_scores, ref_select,
                       slots_for)

PAGE = 16
F32 = np.float32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
LENS = [37, 100, 161, 16]  # not page multiples, and one full page


def device_of(request, name):
    return torch.device("cpu") if name == "cpu" else request.getfixturevalue("cuda")


def select_workspace(device, num_seqs, kv_heads, max_blocks):
    if device.type != "cuda":
        return None
    n = mp.select_workspace_bytes(num_seqs, kv_heads, max_blocks)
    return torch.empty(max(n, 1), dtype=torch.uint8, device=device)


# ---- the reference -------------------------------------------------------------------------


def ref_quantize(mx, mn, max_rounding="up", min_rounding="down"):
    """int8_quant.h on exact rows mx, mn [..., D] (float32): (qmx, qmn int8 [..., D], s [...]).

    max_rounding="down" / min_rounding="up" give the known-wrong quantizations (rounded
    inward, no correction) that the bound checks must reject."""
    mx, mn = np.asarray(mx, F32), np.asarray(mn, F32)
    with np.errstate(all="ignore"):
        m = np.maximum(np.abs(mx).max(-1), np.abs(mn).max(-1)).astype(F32)
        finite = np.isfinite(mx).all(-1) & np.isfinite(mn).all(-1)
        s0 = (m / F32(127)).astype(F32)
        s = np.where((F32(127) * s0).astype(F32) >= m, s0, np.nextafter(s0, F32(np.inf)))
        s = np.where(m == 0, F32(0), s)
        s = np.where(finite, s, F32(np.inf)).astype(F32)
        sv = s[..., None]
        if max_rounding == "up":
            hi = np.clip(np.ceil((mx / sv).astype(F32)), -127, 127).astype(F32)
            hi = hi + ((hi * sv).astype(F32) < mx)
        else:
            hi = np.clip(np.floor((mx / sv).astype(F32)), -127, 127)
        if min_rounding == "down":
            lo = np.clip(np.floor((mn / sv).astype(F32)), -127, 127).astype(F32)
            lo = lo - ((lo * sv).astype(F32) > mn)
        else:
            lo = np.clip(np.ceil((mn / sv).astype(F32)), -127, 127)
    zero, inf = (sv == 0), np.isinf(sv)
    hi = np.where(zero, 0, np.where(inf, 127, hi))
    lo = np.where(zero, 0, np.where(inf, -127, lo))
    return hi.astype(np.int8), lo.astype(np.int8), s


class RefInt8:
    """The reference int8 digest of a batch: per used block, codes, scale and dequantized rows."""

    def __init__(self, batch, **rounding):
        self.exact = ref_digests(batch)  # {block: [2, kvh, D]} in the cache dtype
        self.codes, self.scales, self.deq = {}, {}, {}
        for b, e in self.exact.items():
            e32 = e.float().numpy()
            hi, lo, s = ref_quantize(e32[0], e32[1], **rounding)  # [kvh, D], [kvh]
            self.codes[b] = np.stack([hi, lo])
            self.scales[b] = s
            self.deq[b] = (np.stack([hi, lo]).astype(F32) * s[None, :, None]).astype(F32)

    def dequantized(self, num_blocks, kvh, head_dim) -> torch.Tensor:
        """[num_blocks, 2, kvh, D] float32 (NaN for unused blocks), for reference.ref_scores."""
        out = torch.full((num_blocks, 2, kvh, head_dim), float("nan"))
        for b, d in self.deq.items():
            out[b] = torch.from_numpy(d)
        return out


def digest_mismatches(dg: mdg.Int8Digests, ref: RefInt8, used_only=False) -> int:
    """(block, KV head) digests of `dg` whose codes, scale or exact rows differ from `ref`'s,
    plus (unless used_only) unused blocks that lost their poison."""
    codes, scales, exact = dg.codes.cpu(), dg.scales.cpu(), dg.exact.cpu()
    wrong = 0
    for b, e in ref.exact.items():
        same_exact = (exact[b] == e).all(-1).all(0)  # [kvh]
        same_codes = torch.from_numpy(ref.codes[b]).eq(codes[b]).all(-1).all(0)
        same_scale = scales[b].numpy().view(np.uint32) == ref.scales[b].view(np.uint32)
        wrong += int((~(same_exact & same_codes & torch.from_numpy(same_scale))).sum())
    if not used_only:
        unused = sorted(set(range(codes.shape[0])) - set(ref.exact))
        for b in unused:
            wrong += int(not ((codes[b] == mdg.POISON_CODE).all() and scales[b].isnan().all()
                              and exact[b].isnan().all()))
    return wrong


def bound_violations(batch, deq: dict, queries: torch.Tensor | None = None) -> int:
    """Pages (x KV heads) whose dequantized bound fails to contain their keys: some key channel
    outside [deq min, deq max] (exact comparison), or, for each query row q [H, D] of
    `queries` [Q, H, D], the float64 bound sum_c max(q_c max_c, q_c min_c) below the exact
    max of q.k over the page's keys (products of fp32 values are exact in float64; the two
    D-term sums are allowed their float64 rounding, 2 D 2^-53 sum|terms|)."""
    bad = 0
    bs = batch.block_size
    kvh = batch.kv_cache.shape[3]
    for s, n in enumerate(batch.seq_lens.tolist()):
        for p in range(-(-n // bs)):
            keys = batch.keys[s][p * bs:min(n, (p + 1) * bs)].double()  # [t, kvh, D]
            d = torch.from_numpy(deq[int(batch.block_table[s, p])]).double()  # [2, kvh, D]
            inside = (keys <= d[0]) & (keys >= d[1])
            bad += int((~inside.all(-1).all(0)).sum())
            if queries is None:
                continue
            group = queries.shape[1] // kvh
            for q in queries.double():
                for g in range(kvh):
                    qg = q[g * group:(g + 1) * group]  # [group, D]
                    terms = torch.maximum(qg * d[0, g], qg * d[1, g])
                    bound = terms.sum(-1)
                    qk = keys[:, g] @ qg.T  # [t, group]
                    tol = 2 * qg.shape[1] * 2.0**-53 * (terms.abs().sum(-1) +
                                                         (keys[:, g].abs() @ qg.abs().T).amax(0))
                    bad += int((bound < qk.amax(0) - tol).any())
    return bad


def one_hot_queries(heads, head_dim, channels):
    """Queries +-e_c (per channel c in `channels`), every head: the bound for +e_c is the
    dequantized max of channel c, for -e_c minus its min."""
    qs = []
    for c in channels:
        for sign in (1.0, -1.0):
            q = torch.zeros(heads, head_dim)
            q[:, c] = sign
            qs.append(q)
    return torch.stack(qs)


def assert_selection(pages, counts, want):
    got = [[pages[s, g, :int(counts[s, g])].tolist() for g in range(pages.shape[1])]
           for s in range(pages.shape[0])]
    assert got == want


def outlier_batch(gen, dtype, kvh, head_dim, lens=LENS):
    """random_batch with a zero page (scale 0) and a page of large keys (wide scale)."""
    batch = random_batch(gen, dtype, PAGE, kvh, head_dim, lens)
    for s, page, factor in ((0, 1, 0.0), (1, 2, 40.0)):
        blk = int(batch.block_table[s, page])
        rows = slice(page * PAGE, min(lens[s], (page + 1) * PAGE))
        batch.keys[s][rows] = (batch.keys[s][rows].float() * factor).to(dtype)
        batch.kv_cache[0, blk, :rows.stop - rows.start] = batch.keys[s][rows]
    return batch


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_digests_equal_the_reference_built_and_appended(request, gen, device_name, dtype,
                                                             head_dim):
    dev = device_of(request, device_name)
    kvh = 2
    batch = outlier_batch(gen, dtype, kvh, head_dim)
    kv, table, lens = (t.to(dev) for t in (batch.kv_cache, batch.block_table, batch.seq_lens))
    ref = RefInt8(batch)
    built = mdg.for_cache(kv, "int8")
    assert isinstance(built, mdg.Int8Digests) and built.codes.dtype == torch.int8
    mp.build_digests(kv, table, lens, built)
    assert digest_mismatches(built, ref) == 0
    # The same digests from the fused append, in random chunks of each sequence's tokens (a
    # fresh cache: appends write the keys and widen/re-quantize as they go).
    kv2 = torch.full_like(kv, float("nan"))
    appended = mdg.for_cache(kv2, "int8")
    for s, n in enumerate(LENS):
        start = 0
        while start < n:
            step = int(torch.randint(1, 40, (1,), generator=gen))
            pos = list(range(start, min(n, start + step)))
            slots = slots_for(batch.block_table, s, pos, PAGE).to(dev)
            k, v = batch.keys[s][pos].to(dev), batch.values[s][pos].to(dev)
            mp.append_kv_and_digests(kv2, slots, k, v, appended)
            start += step
    assert torch.equal(kv2[0].cpu().nan_to_num(7), kv[0].cpu().nan_to_num(7))
    assert digest_mismatches(appended, ref) == 0
    for name in ("codes", "scales", "exact"):
        a, b = getattr(appended, name).cpu(), getattr(built, name).cpu()
        assert torch.equal(a.view(torch.uint8) if name == "codes" else a.nan_to_num(7),
                           b.view(torch.uint8) if name == "codes" else b.nan_to_num(7)), name
    # The bound contains every key (the module's own digests, dequantized as scoring does).
    deq = built.dequantized().cpu().numpy()
    assert bound_violations(batch, {b: deq[b] for b in ref.exact}) == 0


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_int8_scores_and_selection_equal_the_reference(request, gen, device_name, dtype, group,
                                                       aggregation):
    dev = device_of(request, device_name)
    if dev.type == "cuda" and group not in mp.supported_gpu_group_sizes:
        pytest.skip(f"the GPU kernels take GQA groups {mp.supported_gpu_group_sizes}")
    kvh, head_dim = 2, 64
    batch = outlier_batch(gen, dtype, kvh, head_dim)

    kv, table, lens = (t.to(dev) for t in (batch.kv_cache, batch.block_table, batch.seq_lens))
    dg = mdg.for_cache(kv, "int8")
    mp.build_digests(kv, table, lens, dg)
    ref = RefInt8(batch)
    deq = ref.dequantized(kv.shape[1], kvh, head_dim)
    s = batch.num_seqs
    q = torch.randn(s, kvh * group, head_dim, generator=gen).to(dtype)
    want_scores = ref_scores(q, batch, deq, aggregation)
    scores = torch.full((s, kvh, table.shape[1]), float("nan"), device=dev)
    mp.compute_relevancy(q.to(dev), kv, dg, table, lens, scores, aggregation=aggregation)
    assert np.array_equal(scores.cpu().numpy().view(np.uint32), want_scores.view(np.uint32))
    budget = 3 * PAGE  # 3 of up to 11 pages: real choices beyond the sink and local pages
    want = ref_select(want_scores, LENS, PAGE, budget, 1, 1)
    pages = torch.full((s, kvh, budget // PAGE), -5, dtype=torch.int32, device=dev)
    counts = torch.full((s, kvh), -5, dtype=torch.int32, device=dev)
    mp.score_and_select(q.to(dev), kv, dg, table, lens, pages, counts, budget=budget,
                        aggregation=aggregation,
                        workspace=select_workspace(dev, s, kvh, table.shape[1]))
    assert_selection(pages.cpu(), counts.cpu(), want)
    # The torch operators take the three tensors.
    import mempipe.ops  # noqa: F401
    if dev.type == "cpu":  # (on CUDA the ops allocate their workspace per call; same kernels)
        op_scores = torch.ops.mempipe.compute_relevancy(
            q, kv, dg.codes, table, lens, aggregation, digest_scales=dg.scales,
            digest_exact=dg.exact)
        assert np.array_equal(op_scores.numpy().view(np.uint32), want_scores.view(np.uint32))
    p2, c2 = torch.ops.mempipe.score_and_select(q.to(dev), kv, dg.codes, table, lens, budget, 1,
                                                1, aggregation, digest_scales=dg.scales,
                                                digest_exact=dg.exact)
    assert_selection(p2.cpu(), c2.cpu(), want)
    # The scored bound is >= the exact max of q.k on every page: for these queries, and for
    # +-e_c on a few channels, which pin the bound to the dequantized max / -min of channel c.
    checks = torch.cat([q.float()[:2], one_hot_queries(kvh * group, head_dim, (0, 5, 63))])
    assert bound_violations(batch, ref.deq, checks) == 0


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_paged_layer_int8_decode_uses_the_reference_selection(request, gen, device_name):
    """PagedLayer with digest_dtype=int8 (placement cpu on host tensors, gpu on CUDA ones):
    its digests are int8, the fused append keeps them, and the sparse output equals float64
    attention over the reference selection of the int8 bound."""
    dev = device_of(request, device_name)
    dtype, kvh, group, head_dim = torch.float32, 2, 3, 64
    placement = "gpu" if dev.type == "cuda" else "cpu"
    cfg = MempipeConfig(placement=placement, budget=3 * PAGE, page_size=PAGE, dense_layers=0,
                        digest_dtype="int8")
    assert cfg.validate() == []
    layer = PagedLayer(cfg, 0, kvh * group, kvh, head_dim, head_dim ** -0.5, plan=DecodePlan())
    # An empty cache of the batch's geometry, filled token by token through the layer.
    batch = random_batch(gen, dtype, PAGE, kvh, head_dim, LENS)
    kv = torch.full_like(batch.kv_cache, float("nan")).to(dev)
    for pos in range(max(LENS)):
        rows = [s for s, n in enumerate(LENS) if pos < n]
        slots = torch.cat([slots_for(batch.block_table, s, [pos], PAGE) for s in rows])
        k = torch.stack([batch.keys[s][pos] for s in rows])
        v = torch.stack([batch.values[s][pos] for s in rows])
        layer.append(kv, slots.to(dev), k.to(dev), v.to(dev))
    dg = layer.digests(kv)
    assert isinstance(dg, mdg.Int8Digests)
    ref = RefInt8(batch)
    # On a device the unused blocks keep their poison; host digests are zeros mapped on first
    # write (mempipe.digests.empty, poison=False), and appends touch only the used blocks.
    assert digest_mismatches(dg, ref, used_only=dev.type == "cpu") == 0
    if dev.type == "cpu":
        unused = [b for b in range(kv.shape[1]) if b not in ref.exact]
        assert unused, "the batch has spare blocks"
        for t in (dg.codes, dg.scales, dg.exact):
            assert not t[unused].any(), "an unused block of host digests was written"
    s = batch.num_seqs
    q = torch.randn(s, kvh * group, head_dim, generator=gen)
    want = ref_select(ref_scores(q, batch, ref.dequantized(kv.shape[1], kvh, head_dim), "max"),
                      LENS, PAGE, cfg.budget, 1, 1)
    out = torch.full((s, kvh * group, head_dim), float("nan"), device=dev)
    layer.decode(q.to(dev), kv, batch.block_table.to(dev), batch.seq_lens.to(dev), out)
    assert layer.calls["sparse"] == 1
    ref_out = ref_decode(q, batch, layer.scale, pages=want)
    err = float((out.cpu().double() - ref_out).abs().max())
    # fp32 storage: the output's rounding plus fp32 accumulation of the logits and of p.v over
    # L tokens and D channels (the derived bound of test_gpu.py)
    vmax = max(float(v.abs().max()) for v in batch.values)
    tol = 2.0**-24 * float(ref_out.abs().max()) + 4 * (max(LENS) + head_dim) * 2.0**-24 * vmax
    assert err <= tol, f"sparse output off the reference selection's by {err:.3e} > {tol:.3e}"



def test_fpga_placement_int8_selects_as_the_module(gen):
    """The card with int8 layers (add_layer digest_dtype='int8': the emulated U55C's int8
    records, its CPU reference functional) selects the pages the module's int8 selection does;
    through PagedLayer (placement fpga, digest_dtype=int8) the output equals placement cpu's."""
    dtype, kvh, head_dim = torch.bfloat16, 2, 64
    batch = outlier_batch(gen, dtype, kvh, head_dim)
    dg = mdg.for_cache(batch.kv_cache, "int8")
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg)
    off = mp.SelectionOffload(device="cpu", paced=False, deadline_ms=5000.0, slots=2, threads=2)
    off.add_layer(0, batch.kv_cache, digest_dtype="int8")
    off.build_digests(0, batch.kv_cache, batch.block_table, batch.seq_lens)
    s, k = batch.num_seqs, 3
    q = torch.randn(s, kvh * 4, head_dim, generator=gen).to(dtype)
    off.submit(0, 0, q, batch.block_table, batch.seq_lens, budget=k * PAGE)
    pages = torch.full((s, kvh, k), -5, dtype=torch.int32)
    counts = torch.full((s, kvh), -5, dtype=torch.int32)
    status = torch.full((1,), -1, dtype=torch.int32)
    off.wait(0, pages, counts, status)
    assert int(status[0]) == 0
    want = ref_select(ref_scores(q, batch, RefInt8(batch).dequantized(
        batch.kv_cache.shape[1], kvh, head_dim), "max"), LENS, PAGE, k * PAGE, 1, 1)
    assert_selection(pages, counts, want)
    with pytest.raises(ValueError, match="'int4'"):
        off.add_layer(1, batch.kv_cache, digest_dtype="int4")
    off.shutdown()

    outs = {}
    for placement in ("cpu", "fpga"):
        cfg = MempipeConfig(placement=placement, budget=k * PAGE, page_size=PAGE,
                            dense_layers=0, digest_dtype="int8", fpga_paced=False,
                            deadline_ms=5000.0)
        plan = DecodePlan()
        layer = PagedLayer(cfg, 0, kvh * 4, kvh, head_dim, head_dim ** -0.5, plan=plan)
        kv = batch.kv_cache.clone()
        layer.card_build(kv, batch.block_table, batch.seq_lens)
        layer_dg = layer.digests(kv)
        mp.build_digests(kv, batch.block_table, batch.seq_lens, layer_dg)
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        layer.decode(q, kv, batch.block_table, batch.seq_lens, out)
        outs[placement] = out
        if placement == "fpga":
            m = plan.offload(cfg, kv.device).metrics()
            assert m["waited"]["selected"] == 1 and m["fallback_total"] == 0, m
            plan.shutdown()
    assert torch.equal(outs["fpga"], outs["cpu"])


def test_checks_reject_known_wrong_answers(gen):
    dtype, kvh, head_dim = torch.float32, 2, 64
    batch = outlier_batch(gen, dtype, kvh, head_dim)
    ref = RefInt8(batch)
    dg = mdg.for_cache(batch.kv_cache, "int8")
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg)
    assert digest_mismatches(dg, ref) == 0
    # Rounded inward: the codes differ from the reference and the bound no longer contains the
    # keys, neither per channel nor for the +-e_c queries that read one channel.
    for rounding in ({"max_rounding": "down"}, {"min_rounding": "up"}):
        wrong = RefInt8(batch, **rounding)
        assert digest_mismatches(dg, wrong, used_only=True) > 0, rounding
        assert bound_violations(batch, wrong.deq) > 0, rounding
        per_channel = bound_violations(batch, wrong.deq)
        assert per_channel > 0, rounding
        hot = one_hot_queries(kvh, head_dim, range(head_dim))
        assert bound_violations(batch, wrong.deq, hot) > per_channel, rounding
    # A page's digest off by one code, and a lost poison, are caught.
    tampered = dg.clone()
    b = next(iter(ref.exact))
    tampered.codes[b, 0, 1, 3] -= 1
    assert digest_mismatches(tampered, ref) == 1
    unused = sorted(set(range(dg.shape[0])) - set(ref.exact))[0]
    tampered = dg.clone()
    tampered.codes[unused] = 0
    assert digest_mismatches(tampered, ref) == 1
    # The native digests' scores are not the int8 ones: the bit-exact score check fails them.
    q = torch.randn(batch.num_seqs, kvh, head_dim, generator=gen)
    native = torch.empty(dg.shape, dtype=dtype)
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, native)
    s_native = torch.empty(batch.num_seqs, kvh, batch.block_table.shape[1])
    mp.compute_relevancy(q, batch.kv_cache, native, batch.block_table, batch.seq_lens, s_native)
    want = ref_scores(q, batch, ref.dequantized(dg.shape[0], kvh, head_dim), "max")
    assert not np.array_equal(s_native.numpy().view(np.uint32), want.view(np.uint32))
    # A selection with one page moved fails the selection check.
    sel = ref_select(want, LENS, PAGE, 3 * PAGE, 1, 1)
    pages = torch.tensor([[row + [-1] * (3 - len(row)) for row in rows] for rows in sel],
                         dtype=torch.int32)
    counts = torch.tensor([[len(row) for row in rows] for rows in sel], dtype=torch.int32)
    assert_selection(pages, counts, sel)
    pages[2, 0, 1] += 1
    with pytest.raises(AssertionError):
        assert_selection(pages, counts, sel)


def test_bad_int8_digests_are_named(gen):
    batch = random_batch(gen, torch.float32, PAGE, 2, 64, [40])
    kv, bt, lens = batch.kv_cache, batch.block_table, batch.seq_lens
    good = mdg.for_cache(kv, "int8")

    class NoExact:
        def __init__(self, d):
            self.codes, self.scales = d.codes, d.scales

    with pytest.raises(ValueError, match="without 'exact'"):
        mp.build_digests(kv, bt, lens, NoExact(good))
    with pytest.raises(ValueError, match=r"digests.codes \(cpu:0, float32.*must be int8"):
        mp.build_digests(kv, bt, lens, mdg.Int8Digests(good.exact, good.scales, good.exact))
    with pytest.raises(ValueError, match=r"digests.scales .*dimension 1"):
        mp.build_digests(kv, bt, lens, mdg.Int8Digests(good.codes, good.scales[:, :1].clone(),
                                                       good.exact))
    with pytest.raises(ValueError, match=r"digests.scales.*must be float32"):
        mp.build_digests(kv, bt, lens, mdg.Int8Digests(good.codes, good.scales.double(),
                                                       good.exact))
    with pytest.raises(ValueError, match=r"digests.exact must have the cache dtype fp32"):
        mp.build_digests(kv, bt, lens, mdg.Int8Digests(good.codes, good.scales,
                                                       good.exact.half()))
    with pytest.raises(ValueError, match="digest_scales and digest_exact"):
        mdg.from_op_args(good.codes, good.scales, None)
    with pytest.raises(ValueError, match="'int4'"):
        mdg.empty(4, 2, 64, torch.float32, "cpu", "int4")
    with pytest.raises(TypeError, match="Int8Digests"):
        good[0] = good.exact[0]


def test_scanned_bytes():
    assert mdg.scanned_bytes_per_page_head(128, 2, "native") == 512
    assert mdg.scanned_bytes_per_page_head(128, 2, "int8") == 260
    assert mdg.scanned_bytes_per_page_head(64, 4, "int8") == 132


def test_transformers_adapter_int8_full_budget_generates_native_tokens(gen, monkeypatch):
    """A MempipeCache with digest_dtype=int8 (budget covering the context: the sparse path runs
    on int8 digests and must attend to every page) generates the tokens native digests do."""
    transformers = pytest.importorskip("transformers")
    import mempipe.hf
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=256,
                                   num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=64, initializer_range=0.08,
                                   pad_token_id=0)
    mempipe.hf.register()
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("mempipe")
    ids = torch.randint(3, 500, (2, 120), generator=gen)
    outs, caches = {}, {}
    for dd in ("native", "int8"):
        caches[dd] = mempipe.hf.MempipeCache(MempipeConfig(budget=1024, dense_layers=1,
                                                           digest_dtype=dd))
        with torch.no_grad():
            outs[dd] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                      min_new_tokens=8, do_sample=False,
                                      past_key_values=caches[dd])
    assert torch.equal(outs["int8"], outs["native"])
    # Without a MempipeCache (the adapter re-pages the context per call through the torch
    # operators, int8 digests as digest_scales= / digest_exact=): transformers' SDPA tokens.
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024,dense_layers=1,digest_dtype=int8")
    import mempipe.ops  # noqa: F401
    calls = []
    original = torch.ops.mempipe.score_and_select
    monkeypatch.setattr(torch.ops.mempipe, "score_and_select",
                        lambda *a, **k: calls.append(k["digest_scales"].dtype) or original(*a, **k),
                        raising=False)
    with torch.no_grad():
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  min_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        sdpa = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False)
        model.set_attn_implementation("mempipe")
    assert torch.equal(uncached, sdpa)
    assert calls and set(calls) == {torch.float32}, calls
    # A cache whose pages hold native digests refuses a configuration asking for int8 (it would
    # otherwise score the native ones).
    caches["native"].config = MempipeConfig(budget=1024, dense_layers=1, digest_dtype="int8")
    with torch.no_grad(), pytest.raises(ValueError, match="hold native digests"):
        model(outs["native"][:, -1:], past_key_values=caches["native"])
    layer = caches["int8"].layers[1]
    assert isinstance(layer.digests, mdg.Int8Digests)
    assert caches["int8"].calls()["sparse"] == 2 * 7
    # The kept digests are the reference's for the cache's pages (bulk prompt + appends).
    n = layer.length
    keys = logical_keys(layer.kv_cache)  # any kv_layout, page_kt included
    for b in range(layer.batch):
        for p in range(math.ceil(n / layer.page)):
            blk = int(layer.block_table[b, p])
            k = keys[blk, :min(layer.page, n - p * layer.page)]
            hi, lo, s = ref_quantize(k.amax(0).numpy(), k.amin(0).numpy())
            assert np.array_equal(layer.digests.codes[blk, 0].numpy(), hi)
            assert np.array_equal(layer.digests.codes[blk, 1].numpy(), lo)
            assert np.array_equal(layer.digests.scales[blk].numpy().view(np.uint32),
                                  s.view(np.uint32))
