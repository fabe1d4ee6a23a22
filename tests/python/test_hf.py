"""A transformers model outside vLLM computing with torch.ops.mempipe (mempipe.hf): the tiny
random-weight Llama generates the same greedy tokens as transformers' SDPA attention when the
budget covers the context. With a budget of a quarter of the context the sparse path must choose
pages, and every sparse step is checked inside generate (selection_check.py): a planted
relevant page is chosen, the selection equals the float64 reference's and the output equals the
float64 attention over the reference's pages; a position-only selection and mempipe's own minus
the planted page are shown to fail those checks."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mempipe.hf  # noqa: E402
from selection_check import SelectionCheck, assert_all_caught, assert_all_correct  # noqa: E402

# A quarter of the 256-token prompt: 4 pages of 16 (1 sink + 1 local + 2 chosen of 14 middle).
QUARTER = "budget=64,page_size=16"
WRONG_MODES = ["position", "drop"]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, initializer_range=0.08, pad_token_id=0)
    mempipe.hf.register()
    mempipe.hf.register()  # idempotent
    return LlamaForCausalLM(cfg).eval()


def _generate(model, impl, ids):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        # min_new_tokens: the random model may emit EOS; the test wants every step.
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False)


def test_full_budget_matches_sdpa(model, gen, monkeypatch):
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024,dense_layers=1")
    ids = torch.randint(3, 500, (2, 150), generator=gen)
    assert torch.equal(_generate(model, "mempipe", ids), _generate(model, "sdpa", ids))


@pytest.mark.parametrize("mode", ["mempipe"] + WRONG_MODES)
def test_quarter_budget_chooses_correct_pages(model, gen, monkeypatch, mode):
    """The uncached path (torch.ops.mempipe per step). mode "mempipe" must pass every check;
    the wrong selections must fail each of them."""
    monkeypatch.setenv("MEMPIPE_CONFIG", f"{QUARTER},dense_layers=0")
    calls = []
    original = torch.ops.mempipe.sparse_decode
    monkeypatch.setattr(torch.ops.mempipe, "sparse_decode",
                        lambda *a: calls.append(a[5].clone()) or original(*a), raising=False)
    check = SelectionCheck(mode).install(monkeypatch.setattr)
    ids = torch.randint(3, 500, (1, 256), generator=gen)
    model.set_attn_implementation("mempipe")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 260)
    # 64 tokens = 4 pages a head; 3 where "drop" removed a planted page. A step whose queries
    # sum to zero (a generated padding token) plants nothing and keeps 4.
    assert calls and len(calls) == len(check.planted_steps)
    want = [3 if mode == "drop" and 0 in planted else 4 for planted in check.planted_steps]
    assert [int(c.max()) for c in calls] == want
    assert [int(c.min()) for c in calls] == want
    summary = check.summary()
    print(f"selection check ({mode}):", summary)
    (assert_all_correct if mode == "mempipe" else assert_all_caught)(summary)


def test_padding_masks_are_rejected(model):
    model.set_attn_implementation("mempipe")
    ids = torch.randint(3, 500, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="without padding"):
        model(ids, attention_mask=mask)


def _generate_cached(model, ids, cache=None, steps=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, past_key_values=cache)


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_paged_cache_matches_sdpa_and_keeps_pages(request, model, gen, monkeypatch,
                                                  device_name):
    """With a MempipeCache the pages and digests persist across steps (no re-paging): the
    greedy tokens equal SDPA's when the budget covers the context, each decode step appends
    one token per layer, and the sparse layers ran their own path."""
    dev = torch.device("cpu") if device_name == "cpu" else request.getfixturevalue("cuda")
    placement = "gpu" if dev.type == "cuda" else "cpu"
    monkeypatch.setenv("MEMPIPE_CONFIG", f"placement={placement},budget=1024,dense_layers=1")
    m = model.to(dev)
    try:
        ids = torch.randint(3, 500, (2, 150), generator=gen).to(dev)
        m.set_attn_implementation("sdpa")
        want = _generate_cached(m, ids)
        m.set_attn_implementation("mempipe")
        cache = mempipe.hf.MempipeCache()
        got = _generate_cached(m, ids, cache)
        assert torch.equal(got, want)
        layer = cache.layers[1]
        assert layer.length == 150 + 11 and layer.kv_cache.device.type == dev.type
        calls = cache.calls()
        # 4 layers; 11 decode steps (the 12th token needs no forward); layer 0 dense.
        assert calls == {"sparse": 3 * 11, "dense": 11, "prefill": 4}, calls
    finally:
        model.to("cpu")


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_paged_cache_small_budget_runs_sparse(request, model, gen, monkeypatch, device_name):
    dev = torch.device("cpu") if device_name == "cpu" else request.getfixturevalue("cuda")
    placement = "gpu" if dev.type == "cuda" else "cpu"
    monkeypatch.setenv("MEMPIPE_CONFIG", f"placement={placement},{QUARTER},dense_layers=0")
    check = SelectionCheck().install(monkeypatch.setattr)
    m = model.to(dev)
    try:
        m.set_attn_implementation("mempipe")
        ids = torch.randint(3, 500, (1, 256), generator=gen).to(dev)
        cache = mempipe.hf.MempipeCache()
        out = _generate_cached(m, ids, cache, steps=6)
        assert out.shape == (1, 262)
        assert cache.calls()["sparse"] == 4 * 5 and cache.calls()["dense"] == 0
        if dev.type == "cpu":  # the checks run on CPU tensors (the GPU tests check selections)
            print("selection check:", check.summary())
            assert_all_correct(check.summary())
    finally:
        model.to("cpu")


def test_head_and_token_major_host_caches_give_the_same_tokens(model, gen, monkeypatch):
    """kv_layout=head (each KV head's page contiguous, a permuted view), page,
    head_kt, page_kt (K pages transposed) and token hold the same logical cache: the same
    greedy tokens and the same digests (the _kt layouts within fp32 rounding), at a budget that
    makes the layers sparse; only the token-major cache is contiguous."""
    ids = torch.randint(3, 500, (1, 256), generator=gen)
    results = {}
    model.set_attn_implementation("mempipe")
    for layout in ("head", "page", "head_kt", "page_kt", "token"):
        monkeypatch.setenv("MEMPIPE_CONFIG", f"placement=cpu,{QUARTER},dense_layers=0,"
                                             f"kv_layout={layout}")
        cache = mempipe.hf.MempipeCache()
        out = _generate_cached(model, ids, cache, steps=4)
        layer = cache.layers[1]
        assert layer.kv_cache.is_contiguous() == (layout == "token")
        assert mempipe.attention.keys_transposed(layer.kv_cache) == layout.endswith("_kt")
        assert cache.calls()["sparse"] > 0
        results[layout] = (out, mempipe.attention.logical_cache(layer.kv_cache),
                           layer.digests.clone())
    b, kvb, dgb = results["token"]
    for layout in ("head", "page", "head_kt", "page_kt"):
        a, kva, dga = results[layout]
        assert torch.equal(a, b), layout
        # head_kt / page_kt: the transposed pages' scores sum the channels in another order, so
        # layer 0's decode output, and from it layer 1's K/V and digests, differ by fp32
        # rounding (5e-6 seen); a misread page would differ by O(1).
        tol = 1e-4 if layout.endswith("_kt") else 0.0
        torch.testing.assert_close(kva, kvb, equal_nan=True, rtol=tol, atol=tol)
        torch.testing.assert_close(dga, dgb, equal_nan=True, rtol=tol, atol=tol)


def test_poisoned_cache_layouts():
    head = mempipe.attention.poisoned_cache(3, 16, 2, 64, torch.float32, "cpu", "head")
    page = mempipe.attention.poisoned_cache(3, 16, 2, 64, torch.float32, "cpu", "page")
    token = mempipe.attention.poisoned_cache(3, 16, 2, 64, torch.float32, "cpu", "token")
    assert head.shape == page.shape == token.shape == (2, 3, 16, 2, 64)
    assert token.is_contiguous() and not head.is_contiguous() and not page.is_contiguous()
    assert head.permute(0, 1, 3, 2, 4).is_contiguous() and torch.isnan(head).all()
    assert page.permute(1, 3, 0, 2, 4).is_contiguous() and torch.isnan(page).all()
    with pytest.raises(ValueError, match="kv_layout must be head, page, head_kt, page_kt or token, got 'x'"):
        mempipe.attention.poisoned_cache(3, 16, 2, 64, torch.float32, "cpu", "x")


@pytest.mark.parametrize("mode", WRONG_MODES)
def test_paged_cache_wrong_selection_is_caught(model, gen, monkeypatch, mode):
    """The same checks on the MempipeCache path fail for a wrong selection."""
    monkeypatch.setenv("MEMPIPE_CONFIG", f"placement=cpu,{QUARTER},dense_layers=0")
    check = SelectionCheck(mode).install(monkeypatch.setattr)
    model.set_attn_implementation("mempipe")
    ids = torch.randint(3, 500, (1, 256), generator=gen)
    _generate_cached(model, ids, mempipe.hf.MempipeCache(), steps=3)
    print(f"selection check ({mode}):", check.summary())
    assert_all_caught(check.summary())
