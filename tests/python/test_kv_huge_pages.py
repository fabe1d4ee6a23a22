"""Huge pages for the host KV cache (core/huge_pages.h, `_mempipe.back_with_huge_pages`, and the
vLLM backend's MEMPIPE_KV_HUGE_PAGES): every byte kept, the storage backed by 2 MiB pages where
the kernel allows it, once per storage, a refusal a warning and never an error. Random contents
from the test's fresh seed."""

import pathlib
import re
import types

import numpy as np
import pytest
import torch

from mempipe import _mempipe as mp

HUGE = 2 << 20


def _thp_mode() -> str:
    """THP's system mode ("always", "madvise", "never"), or "" without THP."""
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


needs_thp = pytest.mark.skipif(_thp_mode() in ("", "never"),
                               reason=f"THP mode {_thp_mode()!r}: no huge pages to collapse into")


def _random_cache(gen, nbytes=20 * HUGE + 12345):
    """A host buffer as vLLM's KV cache is: allocated, then written (every page faulted in)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
    return t


def _interior(t):
    s = t.untyped_storage()
    lo, hi = s.data_ptr(), s.data_ptr() + s.nbytes()
    return ((hi // HUGE) - (-(-lo // HUGE))) * HUGE


@needs_thp
def test_collapse_keeps_every_byte_and_backs_the_interior(gen):
    t = _random_cache(gen)
    copy = t.clone()
    s = t.untyped_storage()
    r = mp.back_with_huge_pages(s.data_ptr(), s.nbytes(), mode="collapse")
    assert torch.equal(t, copy)
    assert r["advised_bytes"] == _interior(t) >= 19 * HUGE
    assert r["huge_after"] >= r["advised_bytes"] and r["incomplete"] == ""
    assert mp.huge_page_bytes(s.data_ptr(), s.nbytes()) == r["huge_after"]
    # The measure is not a constant: a 4 KiB-paged buffer of the same size reads as less.
    other = _random_cache(gen)
    o = other.untyped_storage()
    assert mp.huge_page_bytes(o.data_ptr(), o.nbytes()) < r["huge_after"] or _thp_mode() == "always"


def test_bad_mode_is_named():
    t = torch.zeros(HUGE * 2, dtype=torch.uint8)
    s = t.untyped_storage()
    with pytest.raises(ValueError, match='got "sometimes"'):
        mp.back_with_huge_pages(s.data_ptr(), s.nbytes(), mode="sometimes")


# ---- the vLLM backend ------------------------------------------------------------------------


@pytest.fixture
def backend(monkeypatch):
    from vllm_support import require_vllm
    require_vllm()
    from mempipe.vllm import backend as b
    monkeypatch.delenv("MEMPIPE_KV_HUGE_PAGES", raising=False)
    monkeypatch.delenv("MEMPIPE_KV_COLLAPSE_SHARE", raising=False)
    monkeypatch.setattr(b, "_HUGE_PAGED", set())
    monkeypatch.setattr(b, "_KV_HUGE", {})
    return b


def test_backend_mode_default_and_bad_value(backend, monkeypatch):
    assert backend.kv_huge_page_mode() == "collapse"
    monkeypatch.setenv("MEMPIPE_KV_HUGE_PAGES", "advise")
    assert backend.kv_huge_page_mode() == "advise"
    monkeypatch.setenv("MEMPIPE_KV_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="one of collapse, collapse_all, advise, off, got 'yes'"):
        backend.kv_huge_page_mode()


def test_collapse_share_default_and_bad_values(backend, monkeypatch):
    assert backend.kv_collapse_share() == 0.02
    monkeypatch.setenv("MEMPIPE_KV_COLLAPSE_SHARE", "1")
    assert backend.kv_collapse_share() == 1.0
    for bad in ("0", "1.5", "-0.1", "nan", "inf", "half"):
        monkeypatch.setenv("MEMPIPE_KV_COLLAPSE_SHARE", bad)
        with pytest.raises(ValueError, match=f"in \\(0, 1\\], got '{bad}'"):
            backend.kv_collapse_share()


@needs_thp
def test_backend_collapse_all_does_a_storage_once_and_keeps_it(backend, gen):
    t = _random_cache(gen)
    copy = t.clone()
    layer_view = t[HUGE:5 * HUGE]  # a layer's cache is a view into the one storage
    r = backend.back_kv_with_huge_pages(layer_view, "collapse_all")
    assert r is not None and r["huge_after"] >= _interior(t)  # the whole storage, not the view
    assert backend.back_kv_with_huge_pages(t, "collapse_all") is None  # once per storage
    assert torch.equal(t, copy)


def test_backend_off_and_collapse_do_nothing_to_the_whole_storage(backend, gen):
    # off: nothing at all; collapse: nothing up front (KvHugePages, block by block).
    t = _random_cache(gen)
    assert backend.back_kv_with_huge_pages(t, "off") is None
    assert backend.back_kv_with_huge_pages(t, "collapse") is None
    assert not backend._HUGE_PAGED


def test_backend_refusal_is_a_warning_not_an_error(backend, gen, monkeypatch, caplog):
    class Refusing:
        @staticmethod
        def back_with_huge_pages(*_, **__):
            raise ValueError("madvise(MADV_COLLAPSE) failed: EINVAL (test)")
    monkeypatch.setattr(backend, "_mempipe", Refusing)
    t = _random_cache(gen)
    copy = t.clone()
    records = []
    monkeypatch.setattr(backend.logger, "warning", lambda *a: records.append(a[0] % a[1:]))
    assert backend.back_kv_with_huge_pages(t, "collapse_all") is None
    assert torch.equal(t, copy)
    assert len(records) == 1 and "EINVAL (test)" in records[0], records


# ---- MEMPIPE_KV_HUGE_PAGES=collapse: the pages of each block as it comes into use -------------


class _Recorder:
    """Stands in for _mempipe.collapse_huge_pages: records each (address, nbytes) call."""

    def __init__(self):
        self.calls = []

    def collapse_huge_pages(self, ptr, nbytes):
        self.calls.append((ptr, nbytes))
        return {"advised_bytes": nbytes, "ms": 0.0, "incomplete": ""}


def _pages_of_calls(calls):
    pages = []
    for ptr, nbytes in calls:
        assert ptr % HUGE == 0 and nbytes % HUGE == 0 and nbytes > 0, (ptr, nbytes)
        pages += range(ptr // HUGE, (ptr + nbytes) // HUGE)
    return pages


@pytest.mark.parametrize("span", [12 << 10, 3 * HUGE + 5])
def test_kv_huge_pages_collapses_each_touched_page_once_inside_the_storage(backend, gen,
                                                                           monkeypatch, span):
    rec = _Recorder()
    monkeypatch.setattr(backend, "_mempipe", rec)
    lines = []
    monkeypatch.setattr(backend.logger, "info", lambda *a: lines.append(a[0] % a[1:]))
    lo = 7 * HUGE + 4096  # a storage that starts and ends inside a 2 MiB page
    hi = lo + 40 * HUGE + 8192
    pages = backend.KvHugePages(lo, hi - lo)
    want, runs = set(), 0
    for _ in range(3):  # three steps, some ranges repeating earlier ones
        starts = torch.randint(lo, hi - span, (25,), generator=gen).numpy().astype(np.int64)
        # and five ranges that straddle a page boundary
        edges = torch.randint(lo // HUGE + 1, (hi - span) // HUGE, (5,), generator=gen)
        starts = np.concatenate((starts, edges.numpy().astype(np.int64) * HUGE - 100))
        pages.collapse(starts, span)
        new = set()
        for s in starts.tolist():  # the whole pages inside the storage that [s, s + span) touches
            new |= {p for p in range(s // HUGE, (s + span - 1) // HUGE + 1)
                    if p * HUGE >= lo and (p + 1) * HUGE <= hi and p not in want}
        want |= new
        # A step's adjacent new pages go in one call.
        runs += sum(1 for p in new if p - 1 not in new)
    got = _pages_of_calls(rec.calls)
    assert len(got) == len(set(got)), "a page collapsed twice"
    assert set(got) == want
    assert pages.collapsed_bytes == len(want) * HUGE
    assert len(rec.calls) == runs
    # Progress: a line each time the total doubles, the last naming a total reached.
    assert 1 <= len(lines) <= len(want).bit_length(), lines
    logged = int(re.search(r"(\d+) MiB of it collapsed", lines[-1]).group(1))
    total = len(want) * 2
    assert 0 < logged <= total < 1 << logged.bit_length(), (lines, total)  # no doubling missed


def test_kv_huge_pages_refusal_warns_once_and_stops(backend, monkeypatch):
    calls = []

    class Refusing:
        @staticmethod
        def collapse_huge_pages(ptr, nbytes):
            calls.append(ptr)
            raise ValueError("madvise(MADV_COLLAPSE) failed: EINVAL (test)")
    monkeypatch.setattr(backend, "_mempipe", Refusing)
    warnings = []
    monkeypatch.setattr(backend.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    pages = backend.KvHugePages(0, 64 * HUGE)
    pages.collapse(np.array([HUGE, 10 * HUGE]), 4096)
    pages.collapse(np.array([20 * HUGE]), 4096)
    assert len(calls) == 1 and len(warnings) == 1 and "EINVAL (test)" in warnings[0]


@pytest.mark.parametrize("layout", ["head", "page", "token", "head_kt", "page_kt"])
def test_block_byte_ranges_cover_exactly_each_blocks_pages(backend, layout):
    # An index tensor laid out as the cache is: block b's K and V elements' offsets, read
    # through the view, bound the byte ranges block_byte_ranges gives (independently of strides).
    from mempipe.attention import layout_view
    nb, page, kvh, d = 9, 16, 3, 64
    idx = torch.arange(2 * nb * page * kvh * d, dtype=torch.int64)
    view = layout_view(idx, nb, page, kvh, d, layout)
    base, plane, block, span = backend.block_byte_ranges(view)
    assert base == idx.data_ptr()
    for b in range(nb):
        for p in range(2):
            offs = view[p, b]
            start = base + p * plane + b * block
            assert start == base + int(offs.min()) * 8
            assert start + span == base + (int(offs.max()) + 1) * 8


@needs_thp
def test_collapse_blocks_backs_their_pages_and_keeps_every_byte(backend, gen):
    if _thp_mode() != "madvise":
        pytest.skip(f"THP mode {_thp_mode()!r}: plain memory is not reliably in 4 KiB pages")
    from mempipe.attention import layout_view
    nb, page, kvh, d = 512, 32, 3, 64  # bf16: 12 KiB per block and plane, 12 MiB in all
    region = torch.randint(-30000, 30000, (2 * nb * page * kvh * d,), dtype=torch.int16,
                           generator=gen).view(torch.bfloat16)
    copy = region.clone()
    s = region.untyped_storage()
    assert mp.huge_page_bytes(s.data_ptr(), s.nbytes()) == 0
    # The layer as vLLM drives it: its cache view (vLLM's [blocks, KVH, page, 2 * D] region,
    # layout head), then a step whose builder listed blocks 3, 4 and 200 as new.
    impl = backend.MempipeAttentionImpl.__new__(backend.MempipeAttentionImpl)
    impl.num_kv_heads, impl.head_size, impl._huge_pages = kvh, d, "collapse"
    impl._collapse_share = 1.0  # each page before its first write
    impl.config = types.SimpleNamespace(kv_layout="head", page_size=page)
    impl._kv_source = None
    impl._cache_view(region.view(nb, kvh, page, 2 * d))
    blocks = np.array([3, 4, 200])
    impl._collapse_blocks(blocks)
    pages = backend.KvHugePages.of(region, 1.0)
    view = layout_view(region, nb, page, kvh, d, "head")
    base, plane, block, span = backend.block_byte_ranges(view)
    assert torch.equal(region.view(torch.int16), copy.view(torch.int16))
    want = {a // HUGE for b in blocks.tolist() for p in range(2)
            for a in (base + p * plane + b * block, base + p * plane + b * block + span - 1)}
    want = {q for q in want if q * HUGE >= s.data_ptr() and
            (q + 1) * HUGE <= s.data_ptr() + s.nbytes()}
    assert pages.collapsed_bytes == len(want) * HUGE > 0
    # torch's 12 MiB allocation is a mapping of its own, never advised: smaps counts exactly
    # the pages collapsed (a collapse of the whole storage, or of none, fails this).
    assert mp.huge_page_bytes(s.data_ptr(), s.nbytes()) == len(want) * HUGE


def test_builder_lists_each_block_once(backend):
    class Spec:
        block_size = 16
    b = backend.MempipeMetadataBuilder.__new__(backend.MempipeMetadataBuilder)
    b.kv_cache_spec = Spec()
    b._written = np.zeros(0, dtype=bool)
    step = lambda *slots: b._new_blocks(torch.tensor(slots, dtype=torch.int64))  # noqa: E731
    assert step(0, 1, 15, 16, 300, -1).tolist() == [0, 1, 18]  # -1: a padding slot
    assert step(17, 31) is None  # block 1, written before
    assert step(17, 47).tolist() == [2]
    assert step(5000, 0).tolist() == [312]  # past the array: it grows
    assert step(-1) is None
    assert b._written.nonzero()[0].tolist() == [0, 1, 2, 18, 312]


# ---- MEMPIPE_KV_COLLAPSE_SHARE below 1: the collapsing within a share of the wall time --------


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class _TimedRecorder(_Recorder):
    """Each call takes `cost(pages)` ms, as the C++ timer would report it."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def collapse_huge_pages(self, ptr, nbytes):
        r = super().collapse_huge_pages(ptr, nbytes)
        r["ms"] = self.cost(nbytes // HUGE)
        return r


def test_drain_keeps_the_collapse_within_its_share_and_finishes(backend, gen, monkeypatch):
    # Pages at 0.2-12 ms each (the Zen 5 VM's range); steps of 0.05-600 ms of wall time.
    costs = (torch.rand(400, generator=gen) * 11.8 + 0.2).tolist()
    rec = _TimedRecorder(lambda n: sum(costs.pop() for _ in range(n)))
    monkeypatch.setattr(backend, "_mempipe", rec)
    monkeypatch.setattr(backend.logger, "info", lambda *a: None)
    clock, share = _Clock(), 0.05
    pages = backend.KvHugePages(0, 1024 * HUGE, share=share, clock=clock)
    starts = torch.randperm(1000, generator=gen)[:300].numpy().astype(np.int64) * HUGE
    pages.collapse(starts[:200], 4096)  # the first prefill's blocks
    assert rec.calls == []  # nothing before any time has passed
    t0, spent, queued = clock.t, 0.0, 200
    while pages.pending or queued < 300:
        clock.t += float(torch.rand(1, generator=gen)) ** 3 * 0.6 + 5e-5
        if queued < 300 and float(torch.rand(1, generator=gen)) < 0.05:  # a block starts a page
            pages.collapse(starts[queued:queued + 1], 4096)
            queued += 1
        else:
            pages.drain()
        assert all(n == HUGE for _, n in rec.calls[-50:])  # a page at a time
        spent = pages.ms
        # Within the share of the time so far, less by at most one page's overshoot ...
        assert spent <= share * (clock.t - t0) * 1e3 + 12.0
        # ... and no credit left unused while pages wait.
        assert not pages.pending or pages._credit <= 0
        assert clock.t - t0 < 3600, "never finished"
    got = _pages_of_calls(rec.calls)
    assert sorted(got) == sorted(s // HUGE for s in starts.tolist())  # each page once
    assert got[:200] == [s // HUGE for s in np.unique(starts[:200]).tolist()]  # queue order


def test_drain_after_a_pause_does_at_most_the_saved_credit(backend, monkeypatch):
    rec = _TimedRecorder(lambda n: 3.0 * n)
    monkeypatch.setattr(backend, "_mempipe", rec)
    monkeypatch.setattr(backend.logger, "info", lambda *a: None)
    clock = _Clock()
    pages = backend.KvHugePages(0, 1024 * HUGE, share=0.05, clock=clock)
    pages.collapse(np.arange(100, dtype=np.int64) * HUGE, 4096)
    clock.t += 3600.0  # an hour idle: 180 s of credit at 5 %, capped
    pages.drain()
    assert pages.ms <= backend._COLLAPSE_CREDIT_MS + 3.0
    assert len(rec.calls) == 7  # 20 ms of credit at 3 ms a page


def test_share_one_collapses_at_once(backend, monkeypatch):
    rec = _TimedRecorder(lambda n: 5.0 * n)
    monkeypatch.setattr(backend, "_mempipe", rec)
    monkeypatch.setattr(backend.logger, "info", lambda *a: None)
    pages = backend.KvHugePages(0, 64 * HUGE, share=1.0, clock=_Clock())
    pages.collapse(np.array([3, 4, 5, 9], dtype=np.int64) * HUGE, 4096)
    assert rec.calls == [(3 * HUGE, 3 * HUGE), (9 * HUGE, HUGE)] and not pages.pending


def _layer_with_pages(backend, monkeypatch, ms_per_page):
    """A layer's huge-page hook alone: (impl, recorder, clock); pages cost ms_per_page, share
    0.05; block b's K page is page b, its V page b + 32."""
    rec = _TimedRecorder(lambda n: ms_per_page * n)
    monkeypatch.setattr(backend, "_mempipe", rec)
    monkeypatch.setattr(backend.logger, "info", lambda *a: None)
    clock = _Clock()
    impl = backend.MempipeAttentionImpl.__new__(backend.MempipeAttentionImpl)
    impl._kv_pages = backend.KvHugePages(0, 64 * HUGE, share=0.05, clock=clock)
    impl._block_bytes = (0, 32 * HUGE, HUGE, 4096)  # block b: K at b x 2 MiB, V 64 MiB on
    return impl, rec, clock


def test_huge_pages_step_drains_on_steps_without_new_blocks(backend, monkeypatch):
    # The layer's per-step hook: new blocks queue (and drain); a step with none still drains.
    impl, rec, clock = _layer_with_pages(backend, monkeypatch, 1.0)
    impl._huge_pages_step(np.array([1, 2]))
    assert rec.calls == [] and len(impl._kv_pages.pending) == 2  # K pages 1-2, V pages 33-34
    clock.t += 0.1  # 5 ms of credit: every queued page (1 ms each)
    impl._huge_pages_step(None)
    assert _pages_of_calls(rec.calls) == [1, 2, 33, 34] and not impl._kv_pages.pending


def test_steps_of_prefill_alone_queue_and_earn_no_credit(backend, monkeypatch):
    # A step without decode tokens (the engine's first prefill) queues its pages and collapses
    # none, and its time earns no credit: the first step that decodes collapses only what its
    # own share allows.
    impl, rec, clock = _layer_with_pages(backend, monkeypatch, 3.0)
    impl._kv_pages.drain(True)  # decode steps with nothing queued: 20 ms of credit saved
    clock.t += 1.0
    impl._kv_pages.drain(True)
    assert impl._kv_pages._credit == backend._COLLAPSE_CREDIT_MS
    impl._huge_pages_step(np.array([1, 2, 3, 4]), decodes=False)
    assert rec.calls == []  # the saved credit waits for a step that decodes
    impl._kv_pages._credit = 0.0
    for _ in range(30):  # 30 layers of a 10 s prefill step
        clock.t += 10.0 / 30
        impl._huge_pages_step(None, decodes=False)
    assert rec.calls == [] and len(impl._kv_pages.pending) == 2  # K pages 1-4, V pages 33-36
    clock.t += 0.02  # then a decode layer: 1 ms of credit, one 3 ms page
    impl._huge_pages_step(None, decodes=True)
    assert _pages_of_calls(rec.calls) == [1]
    # At share 1 every page is collapsed when queued, on any step.
    impl._kv_pages = backend.KvHugePages(0, 64 * HUGE, share=1.0, clock=clock)
    impl._huge_pages_step(np.array([5]), decodes=False)
    assert _pages_of_calls(rec.calls) == [1, 5, 37]


@pytest.mark.parametrize("mode", ["collapse", "advise"])
def test_collapse_spends_only_on_steps_that_decode_past_the_budget(backend, monkeypatch, gen,
                                                                   mode):
    # The builder's collapse_spends, and forward hands it to the layer's huge-page hook: steps
    # that decode a context longer than the budget (64 tokens) spend; decode steps within it,
    # prefill alone, and a mixed step whose long request is the prefill only queue.
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from mempipe.vllm.testing import common_metadata
    bs, kvh, h, d = 16, 2, 4, 64
    monkeypatch.setenv("MEMPIPE_CONFIG", f"budget=64,page_size={bs},dense_layers=0")
    monkeypatch.setenv("MEMPIPE_KV_HUGE_PAGES", mode)
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        impl = backend.MempipeAttentionImpl(h, d, d ** -0.5, kvh)
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=kvh, head_size=d,
                                 dtype=torch.float32)
        builder = backend.MempipeMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vc,
                                                 torch.device("cpu"))
    blocks = 64
    block_table = torch.randperm(blocks, generator=gen)[:60].view(3, 20).to(torch.int32)
    cache = torch.zeros(blocks, kvh, bs, 2 * d)
    spent = []
    hook = impl._huge_pages_step
    impl._huge_pages_step = lambda new, decodes: (spent.append(decodes), hook(new, decodes))

    class Layer:
        layer_name = "model.layers.0.self_attn.attn"

    cases = [  # (q_lens, seq_lens, spends under collapse)
        ([300], [300], False),                # the first prefill
        ([1, 1, 1], [40, 64, 10], False),     # decode, every context within the budget
        ([1, 1, 1], [40, 65, 10], True),      # one context past it
        ([1, 250], [30, 250], False),         # mixed: the long request is the prefill
        ([1, 120], [100, 120], True),         # mixed: a long decode
    ]
    for q_lens, seq_lens, spends in cases:
        meta = builder.build(0, common_metadata(block_table[:len(seq_lens)], seq_lens, q_lens,
                                                bs))
        assert meta.collapse_spends == (spends and mode == "collapse"), (q_lens, seq_lens)
        t = sum(q_lens)
        out = torch.full((t, h * d), float("nan"))
        impl.forward(Layer(), torch.randn(t, h, d, generator=gen),
                     torch.randn(t, kvh, d, generator=gen), torch.randn(t, kvh, d, generator=gen),
                     cache, meta, out)
        assert not out.isnan().any()
    if mode == "collapse":
        assert spent == [c[2] for c in cases]
    else:
        assert spent == []  # advise: no tracker, no hook
