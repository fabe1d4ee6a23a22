"""The front door on both devices: the same module functions, torch operators and PagedLayer on
CPU and CUDA tensors, checked against the float64 / canonical-order references on fresh random
data (seed printed), outputs NaN-poisoned, shuffled block tables, lengths that are not page
multiples, every GQA group size the GPU kernels take.

CUDA variants use the `cuda` fixture (conftest.py): they skip without a GPU or a GPU build,
and fail instead under MEMPIPE_REQUIRE_GPU=1. The CPU variants run the same checks here.

Tolerance of a decode output (absolute), derived rather than picked, u = the unit roundoff of
the storage dtype (2^-24 fp32, 2^-11 fp16, 2^-8 bf16), L = tokens attended, D = head_dim:
    u * max|o|              the output's rounding to the storage dtype
  + u * max|v|              the tensor-core kernels round softmax weights to the storage dtype
                            before p.v (|sum p_i d_i v_i| <= u max|v|); fp32 has no such step
  + 4 (L + D) 2^-24 max|v|  fp32 accumulation of the logits and of p.v (worst-case order)
and `test_checks_reject_known_wrong_answers` shows the check fails a zeroed output and a
dropped page.
"""

import pytest
import torch

from mempipe import _mempipe as mp
from mempipe.attention import DecodePlan, PagedLayer
from mempipe.config import MempipeConfig
from reference import ref_decode, ref_scores, ref_select, random_batch, slots_for

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [g for g in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16) if g in mp.supported_gpu_group_sizes]
LENS = [37, 100, 161]  # not page multiples; page 16
PAGE = 16


def decode_tol(dtype, ref_out, values_max, max_len, head_dim):
    u = UNIT_ROUNDOFF[dtype]
    p_round = u * values_max if dtype != torch.float32 else 0.0
    return (u * float(ref_out.abs().max()) + p_round
            + 4 * (max_len + head_dim) * 2.0**-24 * values_max)


def assert_decode_close(out, ref, dtype, batch, head_dim, what):
    assert not torch.isnan(out).any(), f"{what}: NaN left in the output (unwritten rows)"
    vmax = max(float(v.abs().max()) for v in batch.values)
    tol = decode_tol(dtype, ref, vmax, int(batch.seq_lens.max()), head_dim)
    err = float((out.double().cpu() - ref).abs().max())
    assert err <= tol, f"{what}: max abs error {err:.3e} > derived tolerance {tol:.3e}"
    return tol


def device_of(request, name):
    return torch.device("cpu") if name == "cpu" else request.getfixturevalue("cuda")


def to(batch_tensor, device):
    return batch_tensor.to(device).contiguous()


def decode_workspace(device, num_seqs, num_heads, kv_heads, max_items):
    if device.type != "cuda":
        return None
    n = mp.decode_workspace_bytes(num_seqs, num_heads, kv_heads, max_items,
                                  device=device.index or 0)
    return torch.empty(max(n, 1), dtype=torch.uint8, device=device)


def select_workspace(device, num_seqs, kv_heads, max_blocks):
    if device.type != "cuda":
        return None
    n = mp.select_workspace_bytes(num_seqs, kv_heads, max_blocks)
    return torch.empty(max(n, 1), dtype=torch.uint8, device=device)


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_steps_match_reference(request, gen, device_name, dtype, group, head_dim):
    dev = device_of(request, device_name)
    kvh = 2
    heads = kvh * group
    batch = random_batch(gen, dtype, PAGE, kvh, head_dim, LENS)
    kv = to(batch.kv_cache, dev)
    table, lens = to(batch.block_table, dev), to(batch.seq_lens, dev)
    s = batch.num_seqs
    # Step 1: bulk digests equal the CPU's bit for bit; the fused append too.
    dg_cpu = torch.full((kv.shape[1], 2, kvh, head_dim), float("nan"), dtype=dtype)
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg_cpu)
    dg = torch.full_like(dg_cpu, float("nan")).to(dev)
    mp.build_digests(kv, table, lens, dg)
    torch.testing.assert_close(dg.cpu(), dg_cpu, rtol=0, atol=0, equal_nan=True)
    # Append one token to every sequence through the fused kernel on both devices.
    new_lens = [n + 1 for n in LENS]
    if any(-(-n // PAGE) > batch.block_table.shape[1] for n in new_lens):
        pytest.skip("no spare block column")  # never: random_batch leaves one
    free = sorted(set(range(kv.shape[1])) - set(batch.block_table[batch.block_table >= 0]
                                                .tolist()))
    for si, n in enumerate(LENS):
        if n % PAGE == 0:
            batch.block_table[si, n // PAGE] = free.pop()
    table = to(batch.block_table, dev)
    slots = torch.cat([slots_for(batch.block_table, si, [n], PAGE) for si, n in enumerate(LENS)])
    k_new = torch.randn(s, kvh, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(s, kvh, head_dim, generator=gen).to(dtype)
    mp.append_kv_and_digests(batch.kv_cache, slots, k_new, v_new, dg_cpu)
    if dev.type == "cuda":
        kv_pool, dg_pool = kv.clone(), dg.clone()
        mp.append_kv_and_digests(kv_pool, slots.to(dev), k_new.to(dev), v_new.to(dev), dg_pool)
        # The caller-owned workspace (what DecodePlan passes) gives the same bits as the pool.
        ws_bytes = mp.append_workspace_bytes(kv.shape[1])
        assert ws_bytes > 0
        with pytest.raises(ValueError, match="append_kv_and_digests needs"):
            mp.append_kv_and_digests(kv.clone(), slots.to(dev), k_new.to(dev), v_new.to(dev),
                                     dg.clone(), workspace=torch.empty(
                                         ws_bytes - 1, dtype=torch.uint8, device=dev))
        ws = torch.full((ws_bytes,), 0xAB, dtype=torch.uint8, device=dev)  # any contents
        mp.append_kv_and_digests(kv, slots.to(dev), k_new.to(dev), v_new.to(dev), dg,
                                 workspace=ws)
        torch.testing.assert_close(kv_pool, kv, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(dg_pool, dg, rtol=0, atol=0, equal_nan=True)
    else:
        mp.append_kv_and_digests(kv, slots.to(dev), k_new.to(dev), v_new.to(dev), dg)
    torch.testing.assert_close(kv.cpu(), batch.kv_cache, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dg.cpu(), dg_cpu, rtol=0, atol=0, equal_nan=True)
    for si in range(s):
        batch.keys[si] = torch.cat([batch.keys[si], k_new[si:si + 1]])
        batch.values[si] = torch.cat([batch.values[si], v_new[si:si + 1]])
    batch.seq_lens = torch.tensor(new_lens, dtype=torch.int32)
    lens = to(batch.seq_lens, dev)

    q = torch.randn(s, heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    # Dense decode.
    out = torch.full((s, heads, head_dim), float("nan"), dtype=dtype, device=dev)
    mp.dense_decode(q.to(dev), kv, table, lens, out, scale,
                    workspace=decode_workspace(dev, s, heads, kvh, table.shape[1]))
    assert_decode_close(out, ref_decode(q, batch, scale), dtype, batch, head_dim, "dense")
    # Steps 2-3 equal the canonical reference; step 4 over exactly those pages.
    budget = 3 * PAGE  # 3 of up to 11 pages: real choices beyond sinks and locals
    k_sel = budget // PAGE
    pages = torch.full((s, kvh, k_sel), -5, dtype=torch.int32, device=dev)
    counts = torch.full((s, kvh), -5, dtype=torch.int32, device=dev)
    mp.score_and_select(q.to(dev), kv, dg, table, lens, pages, counts, budget=budget, sinks=1,
                        locals=1, aggregation="max",
                        workspace=select_workspace(dev, s, kvh, table.shape[1]))
    want = ref_select(ref_scores(q, batch, dg_cpu, "max"), new_lens, PAGE, budget, 1, 1)
    got = [[pages[si, g, :int(counts[si, g])].tolist() for g in range(kvh)] for si in range(s)]
    assert got == want
    out.fill_(float("nan"))
    mp.sparse_decode(q.to(dev), kv, table, lens, pages, counts, out, scale,
                     workspace=decode_workspace(dev, s, heads, kvh, k_sel))
    assert_decode_close(out, ref_decode(q, batch, scale, pages=want), dtype, batch, head_dim,
                        "sparse")


def test_checks_reject_known_wrong_answers(gen):
    """The decode check fails a zeroed output and a dropped page; the selection check fails a
    position-only selection."""
    dtype, head_dim = torch.bfloat16, 128
    batch = random_batch(gen, dtype, PAGE, 2, head_dim, LENS)
    q = torch.randn(3, 8, head_dim, generator=gen).to(dtype)
    ref = ref_decode(q, batch, head_dim ** -0.5)
    with pytest.raises(AssertionError, match="derived tolerance"):
        assert_decode_close(torch.zeros_like(q), ref, dtype, batch, head_dim, "zeroed")
    dropped = [[[p for p in range(-(-n // PAGE)) if p != 1]] * 2 for n in LENS]
    wrong = ref_decode(q, batch, head_dim ** -0.5, pages=dropped).to(dtype)
    with pytest.raises(AssertionError, match="derived tolerance"):
        assert_decode_close(wrong, ref, dtype, batch, head_dim, "dropped page")
    dg = torch.full((batch.kv_cache.shape[1], 2, 2, head_dim), float("nan"), dtype=dtype)
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, dg)
    want = ref_select(ref_scores(q, batch, dg, "max"), LENS, PAGE, 3 * PAGE, 1, 1)
    positional = [[[0, 1, -(-n // PAGE) - 1]] * 2 for n in LENS]
    assert positional != want


def test_errors_name_the_tensor_and_its_device(cuda, gen):
    batch = random_batch(gen, torch.bfloat16, PAGE, 2, 64, LENS)
    kv, table, lens = batch.kv_cache.to(cuda), batch.block_table.to(cuda), batch.seq_lens.to(cuda)
    q = torch.randn(3, 4, 64, device=cuda, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    ws = decode_workspace(cuda, 3, 4, 2, table.shape[1])
    with pytest.raises(ValueError, match=r"one device: query \(cuda:\d+, bfloat16.*seq_lens "
                                         r"\(cpu:0, int32, shape \[3\]\)"):
        mp.dense_decode(q, kv, table, batch.seq_lens, out, 0.1, workspace=ws)
    with pytest.raises(ValueError, match=r"query \(cuda:\d+, bfloat16, shape \[3, 4, 64\]\) must "
                                         r"be C-contiguous"):
        mp.dense_decode(q.transpose(0, 1).contiguous().transpose(0, 1), kv, table, lens, out,
                        0.1, workspace=ws)
    with pytest.raises(ValueError, match=r"block_table \(cuda:\d+, int64.*must be int32"):
        mp.dense_decode(q, kv, table.long(), lens, out, 0.1, workspace=ws)
    need = mp.decode_workspace_bytes(3, 4, 2, table.shape[1])
    if need:
        with pytest.raises(ValueError, match=f"needs workspace=.*{need} bytes"):
            mp.dense_decode(q, kv, table, lens, out, 0.1)
        with pytest.raises(ValueError, match="workspace .* holds 1 bytes"):
            mp.dense_decode(q, kv, table, lens, out, 0.1,
                            workspace=torch.empty(1, dtype=torch.uint8, device=cuda))
    with pytest.raises(ValueError, match="needs workspace="):
        mp.score_and_select(q, kv, torch.empty(kv.shape[1], 2, 2, 64, dtype=kv.dtype,
                                               device=cuda), table, lens,
                            torch.empty(3, 2, 2, dtype=torch.int32, device=cuda),
                            torch.empty(3, 2, dtype=torch.int32, device=cuda), budget=32)
    with pytest.raises(NotImplementedError, match="write_kv has no GPU kernel"):
        mp.write_kv(kv, torch.zeros(1, dtype=torch.int64, device=cuda),
                    torch.zeros(1, 2, 64, dtype=kv.dtype, device=cuda),
                    torch.zeros(1, 2, 64, dtype=kv.dtype, device=cuda))
    # A head-major cache (the vLLM backend's host layout) is a host-only layout.
    head_major = kv.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    with pytest.raises(NotImplementedError, match=r"kv_cache \(cuda:\d+.*head-major view in "
                                                  r"device memory"):
        mp.dense_decode(q, head_major, table, lens, out, 0.1, workspace=ws)
    page_major = kv.permute(1, 3, 0, 2, 4).contiguous().permute(2, 0, 3, 1, 4)
    with pytest.raises(NotImplementedError, match=r"kv_cache \(cuda:\d+.*page-major view in "
                                                  r"device memory"):
        mp.dense_decode(q, page_major, table, lens, out, 0.1, workspace=ws)
    with pytest.raises(ValueError, match="stream must be None"):
        mp.dense_decode(q, kv, table, lens, out, 0.1, workspace=ws, stream="main")
    if torch.cuda.device_count() > 1:
        other = torch.cuda.Stream(device=1)
        with pytest.raises(ValueError, match="stream of cuda:1"):
            mp.dense_decode(q, kv, table, lens, out, 0.1, workspace=ws, stream=other)


def test_explicit_stream_orders_the_work(cuda, gen):
    """stream= a torch.cuda.Stream or its raw handle: the kernels run there, ordered after
    the caller's own work on that stream."""
    batch = random_batch(gen, torch.float16, PAGE, 2, 64, LENS)
    q = torch.randn(3, 8, 64, generator=gen).half()
    ref = ref_decode(q, batch, 0.125)
    side = torch.cuda.Stream(device=cuda)
    for stream in (side, side.cuda_stream):
        with torch.cuda.stream(side):
            kv = batch.kv_cache.to(cuda)
            table, lens = batch.block_table.to(cuda), batch.seq_lens.to(cuda)
            qd = q.to(cuda)
            out = torch.full_like(qd, float("nan"))
            ws = decode_workspace(cuda, 3, 8, 2, table.shape[1])
        mp.dense_decode(qd, kv, table, lens, out, 0.125, workspace=ws, stream=stream)
        side.synchronize()
        assert_decode_close(out, ref, torch.float16, batch, 64, f"stream={stream!r}")


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_torch_ops_run_on_the_device(request, gen, device_name):
    import mempipe.ops  # noqa: F401
    dev = device_of(request, device_name)
    dtype = torch.bfloat16
    batch = random_batch(gen, dtype, PAGE, 2, 128, LENS)
    kv, table, lens = batch.kv_cache.to(dev), batch.block_table.to(dev), batch.seq_lens.to(dev)
    dg = torch.full((kv.shape[1], 2, 2, 128), float("nan"), dtype=dtype, device=dev)
    torch.ops.mempipe.build_digests(kv, table, lens, dg)
    q = torch.randn(3, 8, 128, generator=gen).to(dtype)
    pages, counts = torch.ops.mempipe.score_and_select(q.to(dev), kv, dg, table, lens, 48, 1, 1,
                                                       "max")
    assert pages.device == dev
    out = torch.ops.mempipe.sparse_decode(q.to(dev), kv, table, lens, pages, counts,
                                          128 ** -0.5)
    want = [[pages[s, g, :int(counts[s, g])].tolist() for g in range(2)] for s in range(3)]
    assert_decode_close(out, ref_decode(q, batch, 128 ** -0.5, pages=want), dtype, batch, 128,
                        "ops.sparse_decode")
    out = torch.ops.mempipe.dense_decode(q.to(dev), kv, table, lens, 128 ** -0.5)
    assert_decode_close(out, ref_decode(q, batch, 128 ** -0.5), dtype, batch, 128,
                        "ops.dense_decode")


def test_torch_compile_traces_the_operators(cuda, gen):
    """Fake kernels let torch.compile trace the operators on CUDA tensors (fullgraph)."""
    import mempipe.ops  # noqa: F401
    batch = random_batch(gen, torch.bfloat16, PAGE, 2, 64, LENS)
    kv, table, lens = batch.kv_cache.to(cuda), batch.block_table.to(cuda), batch.seq_lens.to(cuda)
    q = torch.randn(3, 4, 64, generator=gen).bfloat16().to(cuda)

    def step(q):
        return torch.ops.mempipe.dense_decode(q * 1.0, kv, table, lens, 0.125)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q), step(q), rtol=0, atol=0)


def _vllm_like_batch(gen, dev, dtype, lens, kvh, head_dim, num_blocks):
    """vLLM-shaped inputs: a shared cache, shuffled block ids, int64 slot mapping."""
    pages = [-(-(n + 4) // PAGE) for n in lens]  # room for 4 decode steps
    perm = torch.randperm(num_blocks, generator=gen)[:sum(pages)].to(torch.int32)
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    used = 0
    for s, p in enumerate(pages):
        table[s, :p] = perm[used:used + p]
        used += p
    kv = torch.full((2, num_blocks, PAGE, kvh, head_dim), float("nan"), dtype=dtype, device=dev)
    return kv, table.to(dev)


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_paged_layer_vllm_shaped_steps(request, gen, device_name):
    """PagedLayer as the vLLM backend drives it: prefill (three prompts in one batch), then
    decode steps appending one token per request; on CUDA the decode steps run without a host
    synchronization and without allocating scratch memory after the first."""
    dev = device_of(request, device_name)
    dtype, kvh, group, head_dim = torch.bfloat16, 2, 4, 128
    heads = kvh * group
    lens = [50, 97, 130]
    kv, table = _vllm_like_batch(gen, dev, dtype, lens, kvh, head_dim, 64)
    cfg = MempipeConfig(placement="gpu" if dev.type == "cuda" else "cpu", budget=48,
                        page_size=PAGE, dense_layers=1)
    plan = DecodePlan()
    layers = [PagedLayer(cfg, i, heads, kvh, head_dim, head_dim ** -0.5, plan=plan)
              for i in range(3)]
    # Prefill: all prompt tokens in one flat batch.
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    slots = torch.cat([slots_for(table.cpu(), s, range(n), PAGE) for s, n in enumerate(lens)])
    t = int(qsl[-1])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    caches = [kv.clone() for _ in layers]
    for layer, cache in zip(layers, caches):
        k = torch.randn(t, kvh, head_dim, generator=gen).to(dtype)
        v = torch.randn(t, kvh, head_dim, generator=gen).to(dtype)
        q = torch.randn(t, heads, head_dim, generator=gen).to(dtype)
        layer.append(cache, slots.to(dev), k.to(dev), v.to(dev))
        out = torch.full((t, heads, head_dim), float("nan"), dtype=dtype, device=dev)
        layer.prefill(q.to(dev), qsl.to(dev), cache, table, seq_lens.to(dev), out)
        assert not torch.isnan(out).any()
        # Reference for sequence 1's last prompt token: dense attention over its prompt.
        a = int(qsl[1])
        n = lens[1]
        ref = torch.softmax((q[a + n - 1].double().view(kvh, group, head_dim)
                             @ k[a:a + n].double().permute(1, 2, 0)) * head_dim ** -0.5, -1) \
            @ v[a:a + n].double().transpose(0, 1)
        got = out[a + n - 1].double().cpu().view(kvh, group, head_dim)
        u = UNIT_ROUNDOFF[dtype]
        tol = u * float(ref.abs().max()) + u * float(v.abs().max()) \
            + 4 * (n + head_dim) * 2.0**-24 * float(v.abs().max())
        assert float((got - ref).abs().max()) <= tol
    allocations = None
    for step in range(4):
        cur = seq_lens + step + 1
        pos = (cur - 1).tolist()
        step_slots = torch.cat([slots_for(table.cpu(), s, [p], PAGE)
                                for s, p in enumerate(pos)]).to(dev)
        lens_dev = cur.to(dev)
        ks = [torch.randn(3, kvh, head_dim, generator=gen).to(dtype).to(dev) for _ in layers]
        vs = [torch.randn(3, kvh, head_dim, generator=gen).to(dtype).to(dev) for _ in layers]
        qs = [torch.randn(3, heads, head_dim, generator=gen).to(dtype).to(dev) for _ in layers]
        outs = [torch.full((3, heads, head_dim), float("nan"), dtype=dtype, device=dev)
                for _ in layers]
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for layer, cache, k, v, q, out in zip(layers, caches, ks, vs, qs, outs):
                layer.append(cache, step_slots, k, v)
                layer.decode(q, cache, table, lens_dev, out)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        if allocations is None:
            allocations = plan.allocations
        assert plan.allocations == allocations, "scratch buffers reallocated in a later step"
        for out in outs:
            assert not torch.isnan(out).any()
        # Layer 0 is dense: equal to a dense decode of the same cache on the CPU.
        ref = torch.empty(3, heads, head_dim, dtype=dtype)
        mp.dense_decode(qs[0].cpu(), caches[0].cpu(), table.cpu(), cur, ref, head_dim ** -0.5)
        u = UNIT_ROUNDOFF[dtype]
        vmax = float(caches[0][1].nan_to_num().abs().max())
        tol = u * float(ref.abs().max()) + u * vmax + 4 * (200 + head_dim) * 2.0**-24 * vmax
        assert float((outs[0].cpu().float() - ref.float()).abs().max()) <= 2 * tol
    assert [layer.calls["sparse"] for layer in layers] == [0, 4, 4]
    assert layers[0].calls["dense"] == 4


def test_cuda_graph_replays_a_multilayer_decode_step(cuda, gen):
    """A 4-layer decode step (append + score/select + sparse or dense decode per layer) is
    captured once in a torch.cuda.CUDAGraph and replayed with new queries, keys and lengths:
    every replay equals the eager step on an identical cache, bit for bit."""
    dtype, kvh, group, head_dim, num_layers = torch.bfloat16, 8, 4, 128, 4
    heads = kvh * group
    torch.cuda.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    lens = [300, 517, 1030]
    s = len(lens)
    kv0, table = _vllm_like_batch(gen, cuda, dtype, [n + 8 for n in lens], kvh, head_dim, 256)
    cfg = MempipeConfig(placement="gpu", budget=128, page_size=PAGE, dense_layers=1)
    plan = DecodePlan()
    layers = [PagedLayer(cfg, i, heads, kvh, head_dim, head_dim ** -0.5, plan=plan)
              for i in range(num_layers)]
    # A prefilled cache: random K/V for every prompt token, digests built in bulk.
    for si, n in enumerate(lens):
        blocks = table[si, :-(-n // PAGE)].long()
        kv0[:, blocks] = torch.randn(2, len(blocks), PAGE, kvh, head_dim, device=cuda).to(dtype)
    base_lens = torch.tensor(lens, dtype=torch.int32, device=cuda)
    dg0 = torch.full((kv0.shape[1], 2, kvh, head_dim), float("nan"), dtype=dtype, device=cuda)
    mp.build_digests(kv0, table, base_lens, dg0)
    states = {name: [(kv0.clone(), dg0.clone()) for _ in layers] for name in ("graph", "eager")}

    # Static inputs of the captured step.
    q_in = torch.zeros(num_layers, s, heads, head_dim, dtype=dtype, device=cuda)
    k_in = torch.zeros(num_layers, s, kvh, head_dim, dtype=dtype, device=cuda)
    v_in = torch.zeros_like(k_in)
    slots_in = torch.zeros(s, dtype=torch.int64, device=cuda)
    lens_in = base_lens.clone()
    out_g = torch.full((num_layers, s, heads, head_dim), float("nan"), dtype=dtype, device=cuda)

    def step(state, q, k, v, slots, seq_lens, out):
        for i, layer in enumerate(layers):
            kv, dg = state[i]
            layer.append(kv, slots, k[i], v[i], digests=dg)
            layer.decode(q[i], kv, table, seq_lens, out[i], digests=dg)

    def inputs(step_index):
        pos = [n + step_index for n in lens]
        slots = torch.stack([table[si, p // PAGE].long() * PAGE + p % PAGE
                             for si, p in enumerate(pos)])
        return (torch.randn(q_in.shape, device=cuda).to(dtype),
                torch.randn(k_in.shape, device=cuda).to(dtype),
                torch.randn(v_in.shape, device=cuda).to(dtype), slots,
                torch.tensor([p + 1 for p in pos], dtype=torch.int32, device=cuda))

    plan.reserve(s, heads, kvh, table.shape[1], cfg.budget // PAGE, cuda)
    # Warm up on a side stream (torch's recipe), then restore the graph state and capture.
    warm = torch.cuda.Stream(device=cuda)
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step(states["graph"], q_in, k_in, v_in, slots_in, lens_in, out_g)
    torch.cuda.current_stream().wait_stream(warm)
    for kv, dg in states["graph"]:
        kv.copy_(kv0)
        dg.copy_(dg0)
    # The append takes the plan's workspace (fixed address), not the stream-ordered pool.
    append_ws = plan.append_workspace(kv0)
    assert append_ws is not None and append_ws.numel() == mp.append_workspace_bytes(kv0.shape[1])
    allocations = plan.allocations
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(states["graph"], q_in, k_in, v_in, slots_in, lens_in, out_g)
    assert plan.allocations == allocations, "capture allocated plan memory"
    assert plan.append_workspace(kv0).data_ptr() == append_ws.data_ptr()
    for i in range(4):
        q, k, v, slots, seq_lens = inputs(i)
        for dst, src in ((q_in, q), (k_in, k), (v_in, v), (slots_in, slots), (lens_in, seq_lens)):
            dst.copy_(src)
        out_g.fill_(float("nan"))
        graph.replay()
        out_e = torch.full_like(out_g, float("nan"))
        step(states["eager"], q, k, v, slots, seq_lens, out_e)
        torch.cuda.synchronize()
        assert not torch.isnan(out_g).any(), f"replay {i}: NaN left in the output"
        assert torch.equal(out_g, out_e), f"replay {i}: graph differs from eager"
        for (kg, dgg), (ke, dge) in zip(states["graph"], states["eager"]):
            assert torch.equal(kg.nan_to_num(7), ke.nan_to_num(7))
            assert torch.equal(dgg.nan_to_num(7), dge.nan_to_num(7))
    # The graph did real work: the sparse layers' output differs from a dense decode.
    dense = torch.empty_like(out_e[1])
    kv1, _ = states["eager"][1]
    mp.dense_decode(q[1], kv1, table, seq_lens, dense, head_dim ** -0.5,
                    workspace=decode_workspace(cuda, s, heads, kvh, table.shape[1]))
    assert not torch.equal(dense, out_e[1])

