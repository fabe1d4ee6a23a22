"""torch.ops.mempipe.*: the custom operators agree with the references, pass torch.library's
operator checks (schema, fake kernels, mutation declarations) and work under torch.compile."""

import pytest
import torch

import mempipe.ops  # noqa: F401
from reference import ATOL, DTYPES, random_batch, ref_decode, ref_scores, ref_select


def _batch(gen, dtype=torch.float32):
    lens = [int(torch.randint(1, 16 * 10, (1,), generator=gen)) for _ in range(3)]
    return random_batch(gen, dtype, 16, 2, 64, lens, write=torch.ops.mempipe.write_kv)


def _digests(batch):
    dg = torch.full((batch.kv_cache.shape[1], 2, 2, 64), float("nan"),
                    dtype=batch.kv_cache.dtype)
    torch.ops.mempipe.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg)
    return dg


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_ops_pipeline_matches_reference(gen, dtype):
    batch = _batch(gen, dtype)
    dg = _digests(batch)
    q = torch.randn(3, 4, 64, generator=gen).to(dtype)
    scores = torch.ops.mempipe.compute_relevancy(q, batch.kv_cache, dg, batch.block_table,
                                                 batch.seq_lens, "sum")
    assert torch.equal(scores, torch.from_numpy(ref_scores(q, batch, dg, "sum")))
    pages, counts = torch.ops.mempipe.score_and_select(q, batch.kv_cache, dg, batch.block_table,
                                                       batch.seq_lens, 64, 1, 1, "max")
    want = ref_select(ref_scores(q, batch, dg, "max"), batch.seq_lens.tolist(), 16, 64, 1, 1)
    assert [[pages[s, g, :int(counts[s, g])].tolist() for g in range(2)] for s in range(3)] == want
    p2, c2 = torch.ops.mempipe.select_pages(
        torch.from_numpy(ref_scores(q, batch, dg, "max")), batch.block_table, batch.seq_lens,
        16, 64, 1, 1)
    assert torch.equal(p2, pages) and torch.equal(c2, counts)
    out = torch.ops.mempipe.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens,
                                          pages, counts, 0.125)
    torch.testing.assert_close(out.double(), ref_decode(q, batch, 0.125, pages=want),
                               atol=ATOL[dtype], rtol=0)
    dense = torch.ops.mempipe.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens,
                                           0.125)
    torch.testing.assert_close(dense.double(), ref_decode(q, batch, 0.125), atol=ATOL[dtype],
                               rtol=0)


def test_append_op_mutates_cache_and_digests(gen):
    batch = _batch(gen)
    dg = _digests(batch)
    kv2 = torch.full_like(batch.kv_cache, float("nan"))
    dg2 = torch.full_like(dg, float("nan"))
    for s, n in enumerate(batch.seq_lens.tolist()):
        slots = (batch.block_table[s, torch.arange(n) // 16].long() * 16 + torch.arange(n) % 16)
        torch.ops.mempipe.append_kv_and_digests(kv2, slots, batch.keys[s], batch.values[s], dg2)
    torch.testing.assert_close(kv2, batch.kv_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(dg2, dg, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["write_kv", "append_kv_and_digests"])
def test_write_ops_take_fused_qkv_slices_in_place(gen, op, monkeypatch):
    """K and V as vLLM slices them out of one fused qkv row per token reach the module's host
    write as they are (the same memory: a .contiguous() in the operator would copy) and give the
    cache and digests of packed copies; rows whose heads are not packed are copied first."""
    from mempipe import ops
    from mempipe.attention import poisoned_cache, write_rows
    seen = []
    real = getattr(ops._mempipe, op)

    def spy(kv, slots, k, v, *rest):
        seen.append((k.data_ptr(), v.data_ptr()))
        return real(kv, slots, k, v, *rest)
    monkeypatch.setattr(ops._mempipe, op, spy)
    bs, kvh, d, n, blocks = 16, 2, 64, 37, 6
    qkv = torch.randn(n, 5 * kvh * d, generator=gen)
    key = qkv[:, 3 * kvh * d:4 * kvh * d].view(n, kvh, d)
    value = qkv[:, 4 * kvh * d:].view(n, kvh, d)
    slots = torch.randperm(blocks * bs, generator=gen)[:n]
    cache = poisoned_cache(blocks, bs, kvh, d, torch.float32, "cpu")
    assert not key.is_contiguous()
    assert write_rows(cache, key).data_ptr() == key.data_ptr()  # a .contiguous() would copy
    spread = qkv[:, :2 * kvh * d].view(n, kvh, 2 * d)[:, :, :d]  # heads 2 * d apart
    copied = write_rows(cache, spread)
    assert copied.data_ptr() != spread.data_ptr() and torch.equal(copied, spread)
    results = []
    for k, v in ((key.contiguous(), value.contiguous()), (key, value), (spread, value)):
        kv = poisoned_cache(blocks, bs, kvh, d, torch.float32, "cpu")
        dg = torch.full((blocks, 2, kvh, d), float("nan"))
        if op == "write_kv":
            torch.ops.mempipe.write_kv(kv, slots, k, v)
        else:
            torch.ops.mempipe.append_kv_and_digests(kv, slots, k, v, dg)
        results.append((kv, dg))
    torch.testing.assert_close(results[1], results[0], equal_nan=True, rtol=0, atol=0)
    assert seen[1] == (key.data_ptr(), value.data_ptr())
    assert seen[2][0] != spread.data_ptr()
    # The check can fail: other rows (the spread ones) give another cache.
    assert not torch.equal(torch.nan_to_num(results[2][0]), torch.nan_to_num(results[0][0]))


def test_opcheck(gen):
    batch = _batch(gen)
    dg = _digests(batch)
    q = torch.randn(3, 4, 64, generator=gen)
    args = {
        torch.ops.mempipe.compute_relevancy.default:
            (q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, "max"),
        torch.ops.mempipe.score_and_select.default:
            (q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, 64, 1, 1, "max"),
        torch.ops.mempipe.dense_decode.default:
            (q, batch.kv_cache, batch.block_table, batch.seq_lens, 0.125),
        torch.ops.mempipe.build_digests.default:
            (batch.kv_cache, batch.block_table, batch.seq_lens, dg.clone()),
    }
    for op, a in args.items():
        torch.library.opcheck(op, a, test_utils=("test_schema", "test_faketensor"))


def test_ops_under_torch_compile(gen):
    batch = _batch(gen)
    dg = _digests(batch)
    q = torch.randn(3, 4, 64, generator=gen)

    def step(q):
        pages, counts = torch.ops.mempipe.score_and_select(
            q, batch.kv_cache, dg, batch.block_table, batch.seq_lens, 64, 1, 1, "max")
        return torch.ops.mempipe.sparse_decode(q, batch.kv_cache, batch.block_table,
                                               batch.seq_lens, pages, counts, 0.125)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), step(q), rtol=0, atol=0)
