"""Property-based fuzzing (hypothesis) of the Python module's entry points (issue 14): each
call either meets its contract or raises ValueError naming the bad value; nothing crashes.
Examples per property: MEMPIPE_HYPOTHESIS_EXAMPLES (default 150)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mempipe import _mempipe, config

EXAMPLES = int(os.environ.get("MEMPIPE_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1

def _selection_ok(pages, counts, seq_lens, block_size, budget, sinks, locals_):
    """The contract of select_pages / score_and_select for every row."""
    k = budget // block_size
    for s, n_tok in enumerate(seq_lens):
        n = -(-n_tok // block_size)
        for h in range(counts.shape[1]):
            c = int(counts[s, h])
            row = pages[s, h, :c].tolist()
            if n <= k:
                assert row == list(range(n)), (s, h, row)
                continue
            assert c == k and row == sorted(set(row)), (s, h, row)
            assert all(0 <= p < n for p in row), (s, h, row)
            assert row[:sinks] == list(range(sinks)), (s, h, row)
            assert row[k - locals_:] == list(range(n - locals_, n)), (s, h, row)


@st.composite
def _selection_case(draw):
    block_size = draw(st.sampled_from(config.PAGE_SIZES))
    num_seqs = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    width = draw(st.integers(1, 12))
    lens = draw(st.lists(st.one_of(st.integers(1, width * block_size),
                                   st.integers(INT32_MIN, INT32_MAX)),
                         min_size=num_seqs, max_size=num_seqs))
    budget = draw(st.one_of(st.integers(1, 8).map(lambda p: p * block_size),
                            st.integers(INT32_MIN, INT32_MAX)))
    sinks = draw(st.integers(-1, 3))
    locals_ = draw(st.integers(-1, 3))
    scores = draw(st.lists(st.floats(width=32), min_size=num_seqs * kv_heads * width,
                           max_size=num_seqs * kv_heads * width))
    return block_size, num_seqs, kv_heads, width, lens, budget, sinks, locals_, scores


@SETTINGS
@given(_selection_case())
def test_select_pages_meets_its_contract_or_raises(case):
    block_size, num_seqs, kv_heads, width, lens, budget, sinks, locals_, scores = case
    scores_t = torch.tensor(scores, dtype=torch.float32).view(num_seqs, kv_heads, width)
    table = torch.randint(0, 64, (num_seqs, width), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    k = max(budget // block_size, 1) if 0 < budget < 2**20 else 1
    pages = torch.full((num_seqs, kv_heads, k), -7, dtype=torch.int32)
    counts = torch.full((num_seqs, kv_heads), -7, dtype=torch.int32)
    try:
        _mempipe.select_pages(scores_t, table, seq_lens, block_size, pages, counts, budget=budget,
                              sinks=sinks, locals=locals_)
    except ValueError as e:
        assert str(e)
        return
    _selection_ok(pages, counts, lens, block_size, budget, sinks, locals_)


@SETTINGS
@given(st.integers(INT32_MAX - 200, INT32_MAX), st.sampled_from(config.PAGE_SIZES),
       st.integers(1, 8))
def test_lengths_near_int32_max_are_refused_not_miscounted(seq_len, block_size, width):
    """Issue 14, item 1: a length near 2^31 overflowed the page count; now it is refused."""
    kv = torch.zeros(2, 4, block_size, 1, 64)
    digests = torch.zeros(4, 2, 1, 64)
    query = torch.zeros(1, 1, 64)
    table = torch.zeros(1, width, dtype=torch.int32)
    # A budget of 2 pages holds the default sink and local page, so the selection settings are
    # valid and only the length can be refused.
    pages = torch.zeros(1, 1, 2, dtype=torch.int32)
    counts = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=str(seq_len)):
        _mempipe.score_and_select(query, kv, digests, table,
                                  torch.tensor([seq_len], dtype=torch.int32), pages, counts,
                                  budget=2 * block_size)
    out = torch.full((1, 1, 64), float("nan"))
    with pytest.raises(ValueError, match=str(seq_len)):
        _mempipe.dense_decode(query, kv, table, torch.tensor([seq_len], dtype=torch.int32), out,
                              0.125)


@SETTINGS
@given(st.integers(1, 2**31 - 1))
def test_any_thread_count_is_served_by_the_bounded_pool(num_threads):
    """Issue 14, item 4: the binding passes num_threads through; the pool caps it."""
    kv = torch.randn(2, 4, 16, 2, 64)
    table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([50], dtype=torch.int32)
    query = torch.randn(1, 4, 64)
    out1, out2 = torch.empty(1, 4, 64), torch.empty(1, 4, 64)
    _mempipe.dense_decode(query, kv, table, seq_lens, out1, 0.125, num_threads=1)
    _mempipe.dense_decode(query, kv, table, seq_lens, out2, 0.125, num_threads=num_threads)
    assert torch.equal(out1, out2)
