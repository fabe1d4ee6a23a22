"""The schemes from Python (issue 11): placement=fpga through the selection-offload engine, the
pipelined micro-batches, reuse (sync and async, with the extension to the newest page) and
cross-layer look-ahead, through PagedLayer and the transformers adapter.

A small multi-layer decoder drives PagedLayer (random weights, a seed printed per test): each
layer's query, key and value come from the hidden state the layers before it wrote, so the
tokens it generates depend on every selection. `placement=fpga` runs the engine's CPU mode on
host tensors (the whole flow, as CI runs it) and its CUDA mode on CUDA tensors (skipped here
without a GPU; MEMPIPE_REQUIRE_GPU=1 makes that skip a failure)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mempipe import _mempipe, schemes
from mempipe.attention import DecodePlan, PagedLayer
from mempipe.config import MempipeConfig

needs_offload = pytest.mark.skipif(not schemes.has_offload(),
                                   reason="this build has no _mempipe.SelectionOffload")

PAGE, H, KVH, D = 16, 4, 2, 64


@pytest.fixture(autouse=True)
def one_thread():
    """The small decoder's matmuls on one thread: torch's OpenMP threads spin between
    operators and slow small steps down on shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Run:
    tokens: list          # [steps] tensors [B] of generated token ids
    outs: list            # [steps][layers] attention outputs
    plan: DecodePlan
    layers: list


def _device(request, name):
    return torch.device("cpu") if name == "cpu" else request.getfixturevalue("cuda")


def _model(seed, layers, hidden=128, vocab=97):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) / s[0] ** 0.5  # noqa: E731
    return {"embed": torch.randn(vocab, hidden, generator=g),
            "unembed": w(hidden, vocab),
            "layers": [{"q": w(hidden, H * D), "k": w(hidden, KVH * D) * 2,
                        "v": w(hidden, KVH * D), "o": w(H * D, hidden)} for _ in range(layers)],
            "g": g}


def run_decoder(cfg: MempipeConfig, seed: int, device, steps=12, layers=4,
                lens=(70, 93, 41), hook=None, model=None) -> Run:
    """Prompts of random keys/values (per sequence `lens` tokens, scattered pages), then
    `steps` greedy decode steps of the small decoder through one PagedLayer per layer."""
    m = model or _model(seed, layers)
    g = torch.Generator().manual_seed(seed + 1)
    B = len(lens)
    max_pages = (max(lens) + steps) // PAGE + 2
    num_blocks = B * max_pages + 3
    perm = torch.randperm(num_blocks, generator=g)[:B * max_pages].to(torch.int32)
    block_table = perm.view(B, max_pages).contiguous()
    plan = DecodePlan()
    pls = [PagedLayer(cfg, i, H, KVH, D, D ** -0.5, plan=plan) for i in range(layers)]
    to = lambda t: t.to(device)  # noqa: E731
    caches = [torch.zeros(2, num_blocks, PAGE, KVH, D, device=device) for _ in range(layers)]

    def slots_of(positions):  # [B, n] token positions -> slot ids
        blocks = block_table.gather(1, positions // PAGE).to(torch.int64)
        return (blocks * PAGE + positions % PAGE).flatten()

    n = max(lens)
    pos = torch.arange(n).unsqueeze(0).expand(B, n)
    keep = (pos < torch.tensor(lens).unsqueeze(1)).flatten()
    slots = torch.where(keep, slots_of(pos), torch.full_like(keep, -1, dtype=torch.int64))
    for i, pl in enumerate(pls):
        k = torch.randn(B * n, KVH, D, generator=g)
        v = torch.randn(B * n, KVH, D, generator=g)
        pl.append(caches[i], to(slots), to(k), to(v))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    tok = torch.randint(0, m["embed"].shape[0], (B,), generator=g)
    weights = [{k: to(w) for k, w in lw.items()} for lw in m["layers"]]
    embed, unembed = to(m["embed"]), to(m["unembed"])
    tokens, outs = [], []
    dev_table, host_lens = to(block_table), seq_lens
    for step in range(steps):
        host_lens = host_lens + 1  # the host knows the lengths (no device read-back)
        new_slots = to(slots_of((host_lens - 1).to(torch.int64).unsqueeze(1)))
        lens_dev = to(host_lens)
        x = embed[to(tok)]
        step_outs = []
        for i, (pl, lw) in enumerate(zip(pls, weights)):
            q = (x @ lw["q"]).view(B, H, D)
            k = (x @ lw["k"]).view(B, KVH, D)
            v = (x @ lw["v"]).view(B, KVH, D)
            pl.append(caches[i], new_slots, k, v)
            out = torch.full((B, H, D), float("nan"), device=device)  # poisoned
            if hook is not None:
                q = hook(step, i, q)
            ahead = None  # lookahead_query=projected: layer i+1's W_q on layer i's input
            if cfg.lookahead and cfg.lookahead_query == "projected" and i + 1 < layers:
                ahead = (x @ weights[i + 1]["q"]).view(B, H, D)
            pl.decode(q, caches[i], dev_table, lens_dev, out, lookahead_query=ahead)
            step_outs.append(out.cpu())
            x = x + out.reshape(B, -1) @ lw["o"]
        tok = (x @ unembed).argmax(-1).cpu()
        tokens.append(tok)
        outs.append(step_outs)
    return Run(tokens, outs, plan, pls)


def _seed(gen):
    return int(torch.randint(0, 1 << 30, (1,), generator=gen))


def _same(a: Run, b: Run) -> bool:
    """Bit-identical attention outputs at every step and layer (hence the same tokens)."""
    return all(torch.equal(x, y) for sa, sb in zip(a.outs, b.outs) for x, y in zip(sa, sb))


SCHEMES = {
    "sync": {},
    "pipelined2": {"mode": "pipelined", "micro_batches": 2},
    "pipelined4": {"mode": "pipelined", "micro_batches": 4},
    "reuse3_async": {"reuse": 3},
    "reuse3_sync": {"reuse": 3, "reuse_async": False},
    "reuse2_pipelined": {"reuse": 2, "mode": "pipelined", "micro_batches": 2},
    "lookahead": {"lookahead": True},
    "lookahead_same": {"lookahead": True, "lookahead_query": "same"},
    "lookahead_pipelined": {"lookahead": True, "mode": "pipelined", "micro_batches": 3},
}


def _cfg(placement, **kw):
    base = dict(placement=placement, budget=48, page_size=PAGE, dense_layers=1)
    base.update(kw)
    return MempipeConfig(**base)


@needs_offload
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_fpga_matches_cpu_placement_bit_for_bit(scheme, gen):
    """placement=fpga (the engine's CPU mode, paced emulated card) decodes bit-identically to
    placement=cpu under every scheme: the card's selections equal the host's."""
    seed = _seed(gen)
    kw = SCHEMES[scheme]
    cpu = run_decoder(_cfg("cpu", **kw), seed, torch.device("cpu"))
    fpga = run_decoder(_cfg("fpga", **kw), seed, torch.device("cpu"))
    assert _same(cpu, fpga)
    assert all(torch.equal(a, b) for a, b in zip(cpu.tokens, fpga.tokens))
    st = fpga.plan.schemes(fpga.layers[0].config)
    assert st.counts["card_requests"] > 0
    m = fpga.plan.offload(fpga.layers[0].config, torch.device("cpu")).metrics()
    assert _fallbacks(m) == 0, m
    # The check rejects a known-wrong answer: another budget selects other pages.
    other = run_decoder(_cfg("fpga", **{**kw, "budget": 32}), seed, torch.device("cpu"))
    assert not _same(cpu, other)


@needs_offload
@pytest.mark.parametrize("scheme", ["sync", "pipelined4", "reuse3_async", "reuse3_sync",
                                    "lookahead"])
def test_fpga_matches_gpu_placement_on_cuda(scheme, gen, cuda):
    """CUDA tensors: the engine's CUDA mode (stream-ordered submit and wait, predicated
    fallback) decodes bit-identically to placement=gpu under each scheme."""
    seed = _seed(gen)
    kw = SCHEMES[scheme]
    want = run_decoder(_cfg("gpu", **kw), seed, cuda)
    got = run_decoder(_cfg("fpga", **kw), seed, cuda)
    assert _same(want, got)
    m = got.plan.offload(got.layers[0].config, cuda).metrics()
    assert m["requests"] > 0 and _fallbacks(m) == 0, m
    other = run_decoder(_cfg("gpu", **{**kw, "budget": 32}), seed, cuda)
    assert not _same(want, other)


@needs_offload
@pytest.mark.parametrize("fallback", ["gpu", "dense"])
def test_fallback_on_a_tiny_deadline_on_cuda(fallback, gen, cuda):
    """CUDA: every card selection late (1 us deadline, paced card): the GPU's own selection or
    dense decode, chosen on the device by the status word (no host sync), counted."""
    seed = _seed(gen)
    cfg = _cfg("fpga", deadline_ms=0.001, fpga_fallback=fallback)
    run = run_decoder(cfg, seed, cuda, steps=4)
    want = run_decoder(_cfg("gpu" if fallback == "gpu" else "dense"), seed, cuda, steps=4)
    assert _same(run, want)
    m = run.plan.offload(cfg, cuda).metrics()
    assert _fallbacks(m) == run.plan.schemes(cfg).counts["card_requests"] > 0, m


def _fallbacks(m: dict) -> int:
    """Fallbacks the engine counted (every reason but 'selected')."""
    by = m.get("fallbacks") or m.get("waited") or {}
    if isinstance(by, dict):
        return sum(v for k, v in by.items() if k not in ("selected", "none"))
    return int(by)


@pytest.mark.parametrize("scheme", ["pipelined2", "pipelined4", "lookahead", "lookahead_same"])
def test_schemes_without_reuse_keep_the_tokens_of_sync_where_they_should(scheme, gen):
    """Pipelined micro-batches give exactly the sync answer (selection is per sequence); on
    placement cpu as on fpga."""
    seed = _seed(gen)
    sync = run_decoder(_cfg("cpu"), seed, torch.device("cpu"))
    other = run_decoder(_cfg("cpu", **SCHEMES[scheme]), seed, torch.device("cpu"))
    if scheme.startswith("pipelined"):
        assert _same(sync, other)
    else:  # look-ahead selects with another layer's query: a different answer, still finite
        assert not _same(sync, other)
        assert all(torch.isfinite(o).all() for s in other.outs for o in s)


def test_extend_selection_hand_built():
    pages = torch.tensor([[[0, 3, 5, -1, -1, -1], [0, 1, -1, -1, -1, -1]]], dtype=torch.int32)
    counts = torch.tensor([[3, 2]], dtype=torch.int32)
    # 7 pages of 16 tokens + 1: the last page is 7.
    schemes.extend_selection(pages, counts, torch.tensor([7 * 16 + 1], dtype=torch.int32), 16)
    assert counts.tolist() == [[5, 6]]  # row 0: + pages 6, 7; row 1 capped at the width
    assert pages[0, 0].tolist() == [0, 3, 5, 6, 7, -1]
    assert pages[0, 1].tolist() == [0, 1, 2, 3, 4, 5]
    # Nothing to add: unchanged.
    before = pages.clone()
    schemes.extend_selection(pages, counts, torch.tensor([5 * 16 + 3], dtype=torch.int32), 16)
    assert torch.equal(pages, before)


@pytest.mark.parametrize("reuse_async", [True, False])
def test_reuse_extension_keeps_the_newest_token(reuse_async, gen, monkeypatch):
    """reuse=4 over steps that cross page boundaries: every reused selection holds the newest
    page; without the extension it would not (the test is shown to fail then)."""
    seed = _seed(gen)
    cfg = _cfg("cpu", reuse=4, reuse_async=reuse_async)
    seen = []

    original = schemes.SchemeDecode.decode_rows

    def spy(self, b, e, pages, counts, ws, flag=None):
        if self.c.reuse > 1:
            last = (self.lens[b:e].to(torch.int64) + PAGE - 1) // PAGE - 1
            for s in range(e - b):
                for h in range(KVH):
                    row = pages[b + s, h, :int(counts[b + s, h])].tolist()
                    seen.append(int(last[s]) in row)
        return original(self, b, e, pages, counts, ws, flag)

    monkeypatch.setattr(schemes.SchemeDecode, "decode_rows", spy)
    run = run_decoder(cfg, seed, torch.device("cpu"), steps=20, lens=(30, 47, 15))
    st = run.plan.schemes(cfg)
    assert st.counts["reused"] > 0 and seen and all(seen)
    assert st.report()["stale_reuse"] == 0
    # Known-wrong: without the extension a reused selection misses the newest page.
    seen.clear()
    monkeypatch.setattr(schemes, "extend_selection", lambda *a: None)
    run_decoder(cfg, seed, torch.device("cpu"), steps=20, lens=(30, 47, 15))
    assert seen and not all(seen)


def test_reuse_output_equals_attention_over_the_extended_selection(gen):
    """A reused step's output is attention over (the step-t selection + the pages grown into),
    computed independently with torch from the kept selection."""
    seed = _seed(gen)
    cfg = _cfg("cpu", reuse=4, reuse_async=False, dense_layers=0)
    captured = {}
    original = schemes.SchemeDecode.reused

    def spy(self, sel, sel_ws, dec_ws, pending_flag):
        original(self, sel, sel_ws, dec_ws, pending_flag)
        if self.index == 1:
            captured["last"] = (self.q.clone(), self.kv, self.bt.clone(), self.lens.clone(),
                                sel.pages.clone(), sel.counts.clone(), self.out.clone())

    schemes.SchemeDecode.reused = spy
    try:
        run_decoder(cfg, seed, torch.device("cpu"), steps=7, lens=(31, 47, 16))
    finally:
        schemes.SchemeDecode.reused = original
    q, kv, bt, lens, pages, counts, out = captured["last"]
    for s in range(q.shape[0]):
        last = (int(lens[s]) + PAGE - 1) // PAGE - 1
        for h in range(KVH):
            sel = pages[s, h, :int(counts[s, h])].tolist()
            assert last in sel
            toks = []
            for p in sel:
                n = min(PAGE, int(lens[s]) - p * PAGE)
                toks.append((int(bt[s, p]), n))
            k = torch.cat([kv[0, b, :n, h] for b, n in toks])
            v = torch.cat([kv[1, b, :n, h] for b, n in toks])
            for qh in range(h * (H // KVH), (h + 1) * (H // KVH)):
                w = torch.softmax((k.double() @ q[s, qh].double()) * D ** -0.5, 0)
                want = (w.unsqueeze(1) * v.double()).sum(0)
                # fp32 accumulation over <= 80 tokens: well inside 1e-5 relative.
                assert torch.allclose(out[s, qh].double(), want, rtol=1e-5, atol=1e-6)


def test_selection_recall_hand_built():
    exact = torch.tensor([[[0, 2, 5], [0, 1, 4]]], dtype=torch.int32)
    exact_counts = torch.tensor([[3, 3]], dtype=torch.int32)
    used = torch.tensor([[[0, 1, 5, 6], [0, 1, 4, -1]]], dtype=torch.int32)
    used_counts = torch.tensor([[4, 3]], dtype=torch.int32)
    assert schemes.selection_recall(used, used_counts, exact, exact_counts) == (5, 6)
    # counts bound the rows: entries past the count are not pages
    assert schemes.selection_recall(used, torch.tensor([[1, 1]], dtype=torch.int32), exact,
                                    exact_counts) == (2, 6)


@pytest.mark.parametrize("query", ["same", "projected"])
@pytest.mark.parametrize("placement", ["cpu", pytest.param("fpga", marks=needs_offload)])
def test_lookahead_recall_is_measured(placement, query, gen):
    """Look-ahead recall against a hand-built case: layer 1 reads layer 0's cache (digests
    shared); scored with layer 1's own query the look-ahead selection is the exact one (recall
    1); with the query negated it is not (recall < 1: the check can fail). `same`: layer 0's
    own query is what scores layer 1's digests; `projected`: the speculated query handed to
    layer 0's decode is (layer 0's own query is then a wrong one, -q: unused)."""
    g = torch.Generator().manual_seed(_seed(gen))
    cfg = _cfg(placement, lookahead=True, lookahead_query=query, dense_layers=0, budget=64)
    B, n = 2, 150
    num_blocks = B * 12
    bt = torch.arange(num_blocks, dtype=torch.int32).view(B, 12)
    kv = torch.zeros(2, num_blocks, PAGE, KVH, D)

    def measure(sign):
        plan = DecodePlan()
        a = PagedLayer(cfg, 0, H, KVH, D, D ** -0.5, plan=plan)
        b = PagedLayer(cfg, 1, H, KVH, D, D ** -0.5, plan=plan)
        b.digest_source = a
        a.keep_digests = True
        cache = kv.clone()
        slots = (bt[:, :10].to(torch.int64).unsqueeze(-1) * PAGE
                 + torch.arange(PAGE)).flatten(1)[:, :n].flatten()
        gg = torch.Generator().manual_seed(11)
        a.append(cache, slots, torch.randn(B * n, KVH, D, generator=gg),
                 torch.randn(B * n, KVH, D, generator=gg))
        lens = torch.full((B,), n, dtype=torch.int32)
        st = plan.schemes(cfg)
        for step in range(3):
            q = torch.randn(B, H, D, generator=g)
            out = torch.empty(B, H, D)
            st.profile_recall = step == 2
            if query == "same":
                a.decode(q, cache, bt, lens, out)
                b.decode(q * sign, cache, bt, lens, out)
            else:
                a.decode(-q, cache, bt, lens, out, lookahead_query=q)
                b.decode(q * sign, cache, bt, lens, out)
        return st.report()["recall"]

    assert measure(1.0)["lookahead"] == 1.0
    assert measure(-1.0)["lookahead"] < 1.0


@needs_offload
@pytest.mark.parametrize("fallback", ["gpu", "dense"])
def test_fallback_on_a_tiny_deadline(fallback, gen):
    """A paced card with a 1 us deadline misses every selection: fpga_fallback=gpu then gives
    exactly the host's own selection (placement cpu), fpga_fallback=dense exactly dense decode
    on the sparse layers (placement dense); the timeouts are counted."""
    seed = _seed(gen)
    cfg = _cfg("fpga", deadline_ms=0.001, fpga_paced=True, fpga_fallback=fallback)
    run = run_decoder(cfg, seed, torch.device("cpu"), steps=4)
    want = run_decoder(_cfg("cpu" if fallback == "gpu" else "dense"), seed, torch.device("cpu"),
                       steps=4)
    assert _same(run, want)
    m = run.plan.offload(cfg, torch.device("cpu")).metrics()
    st = run.plan.schemes(cfg)
    assert _fallbacks(m) == st.counts["card_requests"] > 0, m
    # Known-wrong: the other fallback's answer differs.
    other = run_decoder(_cfg("dense" if fallback == "gpu" else "cpu"), seed,
                        torch.device("cpu"), steps=4)
    assert not _same(run, other)


@needs_offload
def test_one_offload_per_model():
    plan = DecodePlan()
    cfg = _cfg("fpga")
    a = plan.offload(cfg, torch.device("cpu"))
    assert plan.offload(_cfg("fpga", reuse=4), torch.device("cpu")) is a
    assert plan.offload(_cfg("fpga", deadline_ms=5.0), torch.device("cpu")) is not a
    plan.shutdown()


@needs_offload
def test_decode_before_the_keys_reach_the_card_is_an_error():
    cfg = _cfg("fpga", dense_layers=0)
    layer = PagedLayer(cfg, 0, H, KVH, D, 0.125, plan=DecodePlan())
    kv = torch.zeros(2, 8, PAGE, KVH, D)
    bt = torch.arange(8, dtype=torch.int32).view(1, 8)
    with pytest.raises(RuntimeError, match="never reached the card"):
        layer.decode(torch.randn(1, H, D), kv, bt, torch.tensor([20], dtype=torch.int32),
                     torch.empty(1, H, D))


def test_micro_batches_split_rows():
    cfg = _cfg("cpu", mode="pipelined", micro_batches=4)
    assert schemes.micro_batches(10, cfg) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert schemes.micro_batches(2, cfg) == [(0, 1), (1, 2)]
    assert schemes.micro_batches(5, _cfg("cpu")) == [(0, 5)]


# ---- the transformers adapter --------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    import mempipe.hf
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, initializer_range=0.08, pad_token_id=0)
    mempipe.hf.register()
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("mempipe")
    return model


def _hf_generate(model, ids, cfg, steps=10):
    import mempipe.hf
    cache = mempipe.hf.MempipeCache(cfg, model=model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, past_key_values=cache)
    return out, cache


HF_SCHEMES = ["sync", "pipelined2", "reuse3_async", "reuse3_sync", "lookahead"]


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("scheme", HF_SCHEMES)
def test_transformers_fpga_generates_the_tokens_of_the_local_placement(request, hf_model, gen,
                                                                       scheme, device_name):
    """transformers + MempipeCache: placement=fpga generates the same tokens as placement=cpu
    (host tensors) / gpu (CUDA tensors) under each scheme, with a budget small enough that the
    selection matters (3 of 10-12 pages), and every sparse layer's card request answered."""
    if not schemes.has_offload():
        pytest.skip("this build has no _mempipe.SelectionOffload")
    dev = _device(request, device_name)
    local = "gpu" if dev.type == "cuda" else "cpu"
    kw = dict(budget=48, page_size=PAGE, dense_layers=1, **SCHEMES[scheme])
    m = hf_model.to(dev)
    try:
        ids = torch.randint(3, 500, (2, 160), generator=gen).to(dev)
        want, _ = _hf_generate(m, ids, MempipeConfig(placement=local, **kw))
        got, cache = _hf_generate(m, ids, MempipeConfig(placement="fpga", **kw))
        assert torch.equal(got, want)
        cfg = MempipeConfig(placement="fpga", **kw)
        off = cache.plan.offload(cfg, dev)
        metrics = off.metrics()
        assert metrics["requests"] > 0 and _fallbacks(metrics) == 0, metrics
        assert cache.calls()["sparse"] == 3 * 9
        # Known-wrong: a larger budget changes the tokens (the check can fail).
        other, _ = _hf_generate(m, ids, MempipeConfig(placement="fpga", **{**kw, "budget": 96}))
        assert not torch.equal(other, want)
    finally:
        hf_model.to("cpu")


@needs_offload
def test_xrt_backend_falls_back_or_is_refused_clearly(gen, noop_xrt):
    """fpga_backend=xrt: on XRT's noop shim (the noop_xrt fixture) every selection is invalid,
    so every request falls back (reason invalid) to the host's own selection, the cpu
    placement's answer; a module built without XRT refuses it, naming the build option."""
    seed = _seed(gen)
    cfg = _cfg("fpga", fpga_backend="xrt")
    try:
        run = run_decoder(cfg, seed, torch.device("cpu"), steps=3)
    except NotImplementedError as e:
        # MEMPIPE_EXPECT_XRT=1 (.ci/python.sh's module built with XRT): the refusal is a failure.
        assert os.environ.get("MEMPIPE_EXPECT_XRT") != "1", f"module built without XRT: {e}"
        assert not noop_xrt and "MEMPIPE_XRT" in str(e)
        return
    assert noop_xrt, "the module opened an XRT device, but no XRT library is loaded"
    assert _same(run, run_decoder(_cfg("cpu"), seed, torch.device("cpu"), steps=3))
    m = run.plan.offload(cfg, torch.device("cpu")).metrics()
    # invalid, then dead once dead_after_failures invalid answers came in a row
    assert _fallbacks(m) == run.plan.schemes(cfg).counts["card_requests"] > 0, m
    assert m["fallbacks"]["invalid"] > 0, m
