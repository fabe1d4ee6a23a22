"""The vLLM backend's per-step shortcuts (issue 16, per-call overhead): what they reuse or skip
must not change what a step computes.

  builder        per-size tensors (decode rows, empty prefill parts) made once and reused by
                 every step of that size, the request split in numpy, slices instead of index
                 copies when decode rows come first: each step's metadata equals a plain-Python
                 reference of the same CommonAttentionMetadata, over steps of changing batch
                 size and kind (decode-only, mixed decode-first, mixed interleaved)
  covered        a sparse layer decodes with the dense kernel when the budget covers every
                 context (MEMPIPE_VLLM_COVERED_DENSE=1, the default): the same output as the
                 sparse path over every page and as the dense reference, and the sparse path
                 still runs once a context outgrows the budget
"""

import pytest
import torch

from reference import ATOL, random_batch, ref_decode, slots_for
from vllm_support import require_vllm

vllm = require_vllm()

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from mempipe.vllm.testing import common_metadata  # noqa: E402
from mempipe.vllm.backend import (MempipeAttentionImpl, MempipeMetadataBuilder,  # noqa: E402
                                  as_mempipe_cache)

BS, KVH, H, D = 16, 2, 4, 64


class FakeLayer:
    def __init__(self, index):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


def _builder(vc):
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=KVH, head_size=D, dtype=torch.float32)
    return MempipeMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vc,
                                  torch.device("cpu"))


def _reference(block_table, seq_lens, query_lens) -> dict:
    """The metadata's request split in plain Python."""
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    dec = [i for i, q in enumerate(query_lens) if q == 1]
    pre = [i for i, q in enumerate(query_lens) if q != 1]
    p_starts = [0]
    for i in pre:
        p_starts.append(p_starts[-1] + query_lens[i])
    return {
        "all_decode": not pre,
        "rows_split": dec == list(range(len(dec))),
        "decode_tokens": [starts[i] for i in dec],
        "decode_seq_lens": [seq_lens[i] for i in dec],
        "decode_block_table": [block_table[i].tolist() for i in dec],
        "prefill_tokens": [t for i in pre for t in range(starts[i], starts[i + 1])],
        "prefill_query_start_loc": p_starts,
        "prefill_seq_lens": [seq_lens[i] for i in pre],
        "prefill_block_table": [block_table[i].tolist() for i in pre],
        "max_prefill_len": max([query_lens[i] for i in pre], default=0),
        "covered_len": max(seq_lens),
    }


def _mismatches(meta, want: dict) -> list[str]:
    got = {
        "all_decode": meta.all_decode, "rows_split": meta.rows_split,
        "max_prefill_len": meta.max_prefill_len, "covered_len": meta.covered_len,
    }
    for name in ("decode_tokens", "decode_seq_lens", "decode_block_table", "prefill_tokens",
                 "prefill_query_start_loc", "prefill_seq_lens", "prefill_block_table"):
        got[name] = getattr(meta, name).tolist()
    bad = [f"{k}: got {got[k]}, want {want[k]}" for k in want
           if got[k] != want[k] and not (k == "rows_split" and want["all_decode"])]
    # dtypes the kernels take
    for name, dtype in (("decode_tokens", torch.int64), ("prefill_tokens", torch.int64),
                        ("decode_seq_lens", torch.int32), ("prefill_query_start_loc",
                                                           torch.int32)):
        if getattr(meta, name).dtype != dtype:
            bad.append(f"{name} dtype {getattr(meta, name).dtype}")
    return bad


def test_builder_reuse_across_batch_sizes_matches_reference(gen, monkeypatch):
    monkeypatch.setenv("MEMPIPE_CONFIG", f"budget=64,dense_layers=1,page_size={BS}")
    monkeypatch.delenv("MEMPIPE_VLLM_COVERED_DENSE", raising=False)
    max_reqs, max_blocks = 6, 10
    # vLLM's persistent block table: the builder sees its first num_reqs rows.
    table = torch.randperm(max_reqs * max_blocks, generator=gen).view(max_reqs, max_blocks)
    table = table.to(torch.int32)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    steps = [
        [1, 1, 1, 1],              # decode, 4 requests
        [1, 1],                    # decode, 2: the size-4 tensors must not leak in
        [1, 1, rand(2, 9), rand(2, 9)],      # mixed, decode rows first (slices)
        [rand(2, 9), 1, rand(2, 9), 1, 1],   # mixed, interleaved (index copies)
        [1, 1, 1, 1, 1, 1],        # decode, 6
        [1, 1, 1, 1],              # decode, 4 again: the reused tensors
        [rand(2, 9), rand(2, 9)],  # prefill only
        [1, 1, 1],                 # decode, 3
        ([1, 1, 1, 1], 8),         # decode, 4, with a loose max_query_len bound
    ]
    with set_current_vllm_config(VllmConfig()):
        builder = _builder(VllmConfig())
    metas, wants = [], []
    for step in steps:
        q_lens, bound = step if isinstance(step, tuple) else (step, None)
        seq_lens = [q + rand(0, 100) for q in q_lens]
        cm = common_metadata(table[:len(seq_lens)], seq_lens, q_lens, BS, bound)
        meta = builder.build(0, cm)
        want = _reference(table, seq_lens, q_lens)
        assert _mismatches(meta, want) == [], q_lens
        metas.append(meta)
        wants.append(want)
    # Earlier steps' metadata is unchanged by later builds (nothing reused is written).
    for meta, want in zip(metas, wants):
        assert _mismatches(meta, want) == []
    # Known-wrong: the check rejects another step's metadata (of another or the same size).
    for i in range(1, len(steps)):
        assert _mismatches(metas[i - 1], wants[i]) != []


def _run_decode(gen_seed, dtype, seq_lens, budget, covered_env, monkeypatch):
    """One decode step of a sparse layer (index 3, dense_layers=2) through build + forward on
    the given contexts; returns (output [S, H, D], the batch, the query, the layer's calls)."""
    monkeypatch.setenv("MEMPIPE_CONFIG", f"budget={budget},dense_layers=2,page_size={BS}")
    monkeypatch.setenv("MEMPIPE_VLLM_COVERED_DENSE", covered_env)
    g = torch.Generator().manual_seed(gen_seed)
    batch = random_batch(g, dtype, BS, KVH, D, seq_lens)
    vllm_cache = torch.full((batch.kv_cache.shape[1], KVH, BS, 2 * D), float("nan"),
                            dtype=dtype)
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        impl = MempipeAttentionImpl(H, D, D ** -0.5, KVH)
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=KVH, head_size=D, dtype=dtype)
        builder = MempipeMetadataBuilder(spec, ["model.layers.3.self_attn.attn"], vc,
                                         torch.device("cpu"))
    ours = as_mempipe_cache(vllm_cache, KVH, D, impl.config.kv_layout)  # the default, auto
    layer = FakeLayer(3)
    paged = impl._paged_layer(layer)
    for s, n in enumerate(seq_lens):  # earlier tokens, through forward's own append path
        paged.append(ours, slots_for(batch.block_table, s, range(n - 1), BS),
                     batch.keys[s][:n - 1], batch.values[s][:n - 1])
    meta = builder.build(0, common_metadata(batch.block_table[:len(seq_lens)], seq_lens,
                                            [1] * len(seq_lens), BS))
    key = torch.stack([batch.keys[s][n - 1] for s, n in enumerate(seq_lens)])
    value = torch.stack([batch.values[s][n - 1] for s, n in enumerate(seq_lens)])
    query = torch.randn(len(seq_lens), H, D, generator=g).to(dtype)
    output = torch.full((len(seq_lens), H * D), float("nan"), dtype=dtype)
    impl.forward(layer, query, key, value, vllm_cache, meta, output)
    return output.view(-1, H, D), batch, query, {"covered": 0, **paged.calls}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_covered_budget_decodes_densely_with_the_same_output(gen, monkeypatch, dtype):
    seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
    budget = 8 * BS
    g = torch.Generator().manual_seed(seed)
    # Every context within the budget (the longest exactly at it: 8 full pages).
    seq_lens = [budget] + [int(torch.randint(2, budget, (1,), generator=g)) for _ in range(3)]
    fast, batch, query, calls = _run_decode(seed, dtype, seq_lens, budget, "1", monkeypatch)
    assert calls["covered"] == 1 and calls["sparse"] == 0, calls
    slow, _, _, slow_calls = _run_decode(seed, dtype, seq_lens, budget, "0", monkeypatch)
    assert slow_calls["sparse"] == 1 and slow_calls["covered"] == 0, slow_calls
    want = ref_decode(query, batch, D ** -0.5)  # dense: every token
    for out in (fast, slow):
        torch.testing.assert_close(out.double(), want, atol=ATOL[dtype], rtol=0)
    # Known-wrong: a budget that drops pages (2 of up to 8) moves the output past the tolerance,
    # so the comparison above can fail.
    small, _, _, small_calls = _run_decode(seed, dtype, seq_lens, 2 * BS, "1", monkeypatch)
    assert small_calls["sparse"] == 1
    with pytest.raises(AssertionError):
        torch.testing.assert_close(small.double(), want, atol=ATOL[dtype], rtol=0)


def test_sparse_path_runs_once_a_context_outgrows_the_budget(gen, monkeypatch):
    seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
    budget = 4 * BS
    seq_lens = [budget + 1, 3, budget]  # one token past the budget: 5 pages
    _, _, _, calls = _run_decode(seed, torch.float32, seq_lens, budget, "1", monkeypatch)
    assert calls["sparse"] == 1 and calls["covered"] == 0, calls


def test_covered_flag_is_checked(monkeypatch):
    monkeypatch.setenv("MEMPIPE_VLLM_COVERED_DENSE", "yes")
    with set_current_vllm_config(VllmConfig()):
        with pytest.raises(ValueError, match="MEMPIPE_VLLM_COVERED_DENSE must be 0 or 1, "
                                             "got 'yes'"):
            _builder(VllmConfig())
