"""The quality harness's own arithmetic (integration/quality), without the model: the
per-query-head budget given directly (`B=hN`), the scorer analysis's RoPE channel mask, page
digests of a partial last page, and the per-query-head union it counts as bytes."""

import math
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "integration" / "quality"))


def test_per_head_budget_given_directly():
    import run
    sel = run.parse_config("per_head:512=h288:16:2:max")
    assert (sel.kind, sel.budget, sel.head_budget) == ("per_head", 512, 288)
    assert "budget=288," in sel.config_string(group=3)
    assert "hb=288" in sel.name
    # Without =h the per-head budget comes from the formula (sinks + locals + 30 // 3 pages).
    formula = run.parse_config("per_head:512:16:2:max")
    assert formula.head_budget == 0 and "budget=192," in formula.config_string(group=3)
    with pytest.raises(ValueError, match="for kind per_head"):
        run.parse_config("mempipe:512=h288:16:2:max")
    with pytest.raises(ValueError, match="integers"):
        run.parse_config("per_head:512=hx:16:2:max")


def test_rope_mask_drops_the_pairs_that_turn_more_than_the_cutoff_per_page():
    import scorers
    d, base, page = 64, 100000.0, 16
    mask = scorers.rope_mask(d, base, page, math.pi)
    # Rotate-half layout: channel i and i + d/2 share theta_i = base^(-2i/d).
    expect = [0.0 if page * base ** (-2 * i / d) > math.pi else 1.0 for i in range(d // 2)]
    assert mask.tolist() == expect + expect
    assert expect[:5] == [0.0] * 5 and expect[5:] == [1.0] * 27  # SmolLM2: 5 pairs of 32
    q = torch.arange(1.0, d + 1)
    out = scorers.transform(q, "rope1", base, page)
    assert out[:5].eq(0).all() and out[32:37].eq(0).all()
    assert torch.equal(out[5:32], q[5:32]) and torch.equal(out[37:], q[37:])
    # topq keeps the r largest |q_c| only.
    kept = scorers.transform(q, "topq4", base, page).nonzero().flatten().tolist()
    assert kept == [60, 61, 62, 63]
    with pytest.raises(ValueError, match="unknown scorer"):
        scorers.transform(q, "nope", base, page)


def test_page_digests_ignore_the_padding_of_a_partial_page():
    import scorers
    # 3 pages of 16, the last holds 5 tokens; all-negative and all-positive keys, so a digest
    # that took the padding (zeros, say) into its max or min would differ.
    for k in (torch.rand(2, 37, 8) - 2.0, torch.rand(2, 37, 8) + 1.0):
        kmax, kmin = scorers.page_view(k, 16)
        assert kmax.shape == (2, 3, 8)
        for p, (a, b) in enumerate(((0, 16), (16, 32), (32, 37))):
            assert torch.equal(kmax[:, p], k[:, a:b].amax(1))
            assert torch.equal(kmin[:, p], k[:, a:b].amin(1))


def test_per_head_union_counts_every_head_s_pages():
    import scorers
    kvh, group, n_pages, k = 1, 3, 20, 5
    # Each query head prefers a disjoint block of middle pages: the union is 2 + 3 (k - 2).
    score = torch.zeros(kvh, group, n_pages)
    for h in range(group):
        score[0, h, 1 + 3 * h:1 + 3 * h + 3] = 10.0
    pmass = torch.full((kvh, group, n_pages), 1.0 / n_pages)
    acc = {k: {"recall": [], "union": [], "needle_hit": []}}
    scorers._per_head(score, pmass, None, [], [k], acc, 0.1)
    assert acc[k]["union"] == [2 + group * (k - 2)]
    assert acc[k]["recall"] == [pytest.approx(k / n_pages)]
    # The same scores for every head (GQA-like agreement): the union is k pages.
    acc = {k: {"recall": [], "union": [], "needle_hit": []}}
    scorers._per_head(score[:, :1].expand(kvh, group, n_pages), pmass, None, [], [k], acc, 0.1)
    assert acc[k]["union"] == [k]
