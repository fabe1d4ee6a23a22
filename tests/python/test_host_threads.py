"""The host decode kernels on torch's OpenMP team (mempipe.host_threads, issue 16): the same
bits as one thread, really on several OpenMP threads, the fallback, and bad input."""

import os
import threading

import pytest
import torch

from mempipe import _mempipe as mp
from mempipe import host_threads
from reference import DTYPES, random_batch

TORCH_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
needs_openmp = pytest.mark.skipif(not TORCH_OPENMP, reason="torch is not built with OpenMP")


@pytest.fixture(autouse=True)
def own_pool_after():
    yield
    host_threads.use_mempipe_pool()


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor):
    """Same shape, dtype and bits (NaN included), with the first differing element named."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g = got.contiguous().view(-1).view(torch.int16 if got.element_size() == 2 else torch.int32)
    w = want.contiguous().view(-1).view(g.dtype)
    diff = (g != w).nonzero()
    assert diff.numel() == 0, (f"{diff.numel()} elements differ, first at flat index "
                               f"{int(diff[0])}: {got.view(-1)[diff[0]]} vs {want.view(-1)[diff[0]]}")


def test_bit_identity_check_rejects_a_one_ulp_difference(gen):
    x = torch.randn(3, 9, 64, generator=gen)
    assert_bit_identical(x, x.clone())
    y = x.clone()
    y[1, 4, 7] = torch.nextafter(y[1, 4, 7], torch.tensor(float("inf")))
    with pytest.raises(AssertionError, match="1 elements differ"):
        assert_bit_identical(y, x)


def _problem(gen, dtype, num_seqs=5, kv_heads=3, heads=9, head_dim=64, block_size=16):
    lens = torch.randint(1, 40 * block_size, (num_seqs,), generator=gen).tolist()
    batch = random_batch(gen, dtype, block_size, kv_heads, head_dim, lens)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    # A random sorted selection of up to 6 pages per (sequence, KV head).
    budget = 6
    pages = torch.full((num_seqs, kv_heads, budget), -1, dtype=torch.int32)
    counts = torch.zeros(num_seqs, kv_heads, dtype=torch.int32)
    for s, n in enumerate(lens):
        num_pages = -(-n // block_size)
        for h in range(kv_heads):
            pick = torch.randperm(num_pages, generator=gen)[:budget].sort().values
            pages[s, h, :pick.numel()] = pick.to(torch.int32)
            counts[s, h] = pick.numel()
    return batch, q, pages, counts


def _work_items(kind, batch, counts):
    """The (chunk, KV head) pairs a decode call splits over its threads (attention/decode.h:
    each sequence's pages, all or the selected ones, in chunks of decode_chunk_tokens)."""
    block_size, kv_heads = batch.kv_cache.shape[2], batch.kv_cache.shape[3]
    chunk_pages = max(1, mp.decode_chunk_tokens // block_size)
    chunks = 0
    for s in range(batch.num_seqs):
        if kind == "dense":
            entries = -(-int(batch.seq_lens[s]) // block_size)
        else:
            entries = int(counts[s].max())
        chunks += -(-entries // chunk_pages)
    return chunks * kv_heads


def _decode(kind, batch, q, pages, counts, threads):
    out = torch.full_like(q, float("nan"))  # a row a kernel forgets stays NaN
    scale = q.shape[-1] ** -0.5
    if kind == "dense":
        mp.dense_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, scale,
                        num_threads=threads)
    else:
        mp.sparse_decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, out,
                         scale, num_threads=threads)
    return out


@needs_openmp
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_torch_team_gives_the_one_thread_bits_on_several_threads(gen, kind, dtype):
    batch, q, pages, counts = _problem(gen, dtype)
    want = _decode(kind, batch, q, pages, counts, 1)
    assert not want.isnan().any()
    library = host_threads.use_torch_openmp()
    assert os.path.basename(library).startswith(("libgomp", "libomp", "libiomp5"))
    info = host_threads.info()
    assert info["installed"] and info["library"] == library
    items = _work_items(kind, batch, counts)
    for threads in (2, 3, 64):
        before = host_threads.info()["team_calls"]
        torch.mm(torch.randn(64, 256), torch.randn(256, 256))  # torch's team, spinning
        got = _decode(kind, batch, q, pages, counts, threads)
        info = host_threads.info()
        assert info["team_calls"] == before + 1, "the call did not run on torch's team"
        team = min(threads, items, 2 * os.cpu_count())  # ForEachSeqHeads' cap (core/parallel.h)
        assert info["last_call_team"] == team, info
        assert 1 <= info["last_call_threads"] <= team, info
        assert_bit_identical(got, want)
    # Back on mempipe's pool: same bits, and the team is not used.
    host_threads.use_mempipe_pool()
    before = host_threads.info()
    got = _decode(kind, batch, q, pages, counts, 3)
    assert not host_threads.info()["installed"]
    assert host_threads.info()["team_calls"] == before["team_calls"]
    assert_bit_identical(got, want)


@needs_openmp
def test_decode_calls_run_on_a_team_of_several_openmp_threads(gen):
    """Each call runs on a team of torch's runtime as large as the largest any call has asked for
    (the runtime's own omp_get_num_threads inside the region; libgomp forms its team again when the
    size asked for changes), and on no more of its threads than it asked for. Which of them end up
    running tasks depends on the scheduler: a thread takes what the others have not started, so on
    a loaded machine the caller may run them all (that tasks really run on two libgomp threads is
    shown with a rendezvous in tests/core/host_parallel_runtime_test.cc, RealLibgomp...)."""
    batch = random_batch(gen, torch.float32, 32, 3, 64, [2048, 1500])
    q = torch.randn(2, 9, 64, generator=gen)
    want = _decode("dense", batch, q, None, None, 1)
    host_threads.use_torch_openmp()
    seen, largest = [], 0
    for threads in (2, 3, 2):
        largest = max(largest, threads)
        torch.mm(torch.randn(64, 256), torch.randn(256, 256))
        assert_bit_identical(_decode("dense", batch, q, None, None, threads), want)
        info = host_threads.info()
        assert info["last_call_team"] == largest, info  # 2, 3, then 3 again
        seen.append(info["last_call_threads"])
    print(f"distinct OpenMP threads that ran tasks, per call: {seen}")
    assert all(1 <= n <= t for n, t in zip(seen, (2, 3, 2))), seen


@needs_openmp
def test_team_size_check_rejects_a_call_that_ran_inline(gen):
    """The team-size figure the tests rely on is the latest team call's: a call that ran on one
    thread (inline, no region) leaves it and the call counter alone."""
    batch, q, pages, counts = _problem(gen, torch.float32)
    host_threads.use_torch_openmp()
    _decode("dense", batch, q, pages, counts, 3)
    before = host_threads.info()
    assert before["last_call_team"] == 3
    _decode("dense", batch, q, pages, counts, 1)
    after = host_threads.info()
    assert after["team_calls"] == before["team_calls"] and after["last_call_team"] == 3


def test_concurrent_callers_on_the_torch_team_stay_right(gen):
    """Several Python threads at once, each outside any team: each gets a team of its own (the
    nested case, a call from inside a team, is in tests/core/host_parallel_runtime_test.cc)."""
    batch, q, pages, counts = _problem(gen, torch.float32)
    want = _decode("sparse", batch, q, pages, counts, 1)
    host_threads.use_torch_openmp()
    got = []

    def work():
        got.append(_decode("sparse", batch, q, pages, counts, 2))
    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(got) == 3
    for g in got:
        assert_bit_identical(g, want)


def test_thread_count_check_rejects_a_call_that_did_not_use_the_team(gen):
    """The team-call counter the test above relies on does not move for a pool call."""
    batch, q, pages, counts = _problem(gen, torch.float32)
    before = host_threads.info()["team_calls"]
    _decode("dense", batch, q, pages, counts, 2)
    assert host_threads.info()["team_calls"] == before


def test_libraries_not_loaded_or_not_openmp_are_rejected():
    with pytest.raises(ValueError, match="path is empty"):
        mp.set_host_parallel_runtime("")
    with pytest.raises(RuntimeError, match="'/nonexistent/libgomp.so.1' is not loaded"):
        mp.set_host_parallel_runtime("/nonexistent/libgomp.so.1")
    with pytest.raises(RuntimeError, match="has no symbol GOMP_parallel"):
        mp.set_host_parallel_runtime("libc.so.6")
    assert not host_threads.info()["installed"]


def test_discovery_reads_the_maps_and_explains_a_missing_runtime(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /opt/venv/torch/lib/libgomp-a34b3233.so.1\n"
        "7f04-7f05 r--p 00000000 08:01 2 /opt/venv/torch/lib/libgomp-a34b3233.so.1\n"
        "7f06-7f07 rw-p 00000000 00:00 0 [heap]\n"
        "7f08-7f09 r-xp 00000000 08:01 3 /usr/lib/libomp.so.5\n"
        "7f0a-7f0b r-xp 00000000 08:01 4 /usr/lib/libgompx.so\n")
    assert host_threads.loaded_openmp_libraries(str(maps)) == [
        "/opt/venv/torch/lib/libgomp-a34b3233.so.1", "/usr/lib/libomp.so.5"]
    if TORCH_OPENMP:
        # Two runtimes, neither inside torch's folder: ambiguous, refused with both named.
        with pytest.raises(RuntimeError, match="several OpenMP runtimes.*libomp.so.5"):
            host_threads.torch_openmp_library(str(maps))
        empty = tmp_path / "empty"
        empty.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
        with pytest.raises(RuntimeError, match="no OpenMP runtime"):
            host_threads.use_torch_openmp(str(empty))
        assert not host_threads.info()["installed"]
    assert host_threads.loaded_openmp_libraries(str(tmp_path / "absent")) == []


# ---- the vLLM backend's flags ----------------------------------------------------------------


@pytest.fixture
def backend(monkeypatch):
    from vllm_support import require_vllm
    require_vllm()
    from mempipe.vllm import backend as b
    monkeypatch.delenv("MEMPIPE_CPU_ATTN_THREADS", raising=False)
    monkeypatch.delenv("MEMPIPE_CPU_ATTN_POOL", raising=False)
    b._use_torch_team.cache_clear()
    yield b
    b._use_torch_team.cache_clear()


def test_backend_default_is_torch_team_with_torch_threads(backend, monkeypatch):
    if not TORCH_OPENMP:
        assert backend.attention_threads() == 1
        return
    assert backend.attention_threads() == max(1, torch.get_num_threads())
    assert host_threads.info()["installed"]
    monkeypatch.setenv("MEMPIPE_CPU_ATTN_THREADS", "3")
    assert backend.attention_threads() == 3
    monkeypatch.setenv("MEMPIPE_CPU_ATTN_THREADS", "0")
    assert backend.attention_threads() == max(1, torch.get_num_threads())
    assert host_threads.info()["installed"]


def test_backend_pool_mempipe_keeps_the_old_behaviour(backend, monkeypatch):
    if TORCH_OPENMP:
        host_threads.use_torch_openmp()
    monkeypatch.setenv("MEMPIPE_CPU_ATTN_POOL", "mempipe")
    assert backend.attention_threads() == 1
    assert not host_threads.info()["installed"]
    monkeypatch.setenv("MEMPIPE_CPU_ATTN_THREADS", "2")
    assert backend.attention_threads() == 2
    assert not host_threads.info()["installed"]


def test_backend_falls_back_to_one_thread_without_torch_team(backend, monkeypatch):
    def missing(*_):
        raise RuntimeError("test: no OpenMP runtime")
    monkeypatch.setattr(host_threads, "use_torch_openmp", missing)
    assert backend.attention_threads() == 1
    assert not host_threads.info()["installed"]
    monkeypatch.setenv("MEMPIPE_CPU_ATTN_THREADS", "0")
    assert backend.attention_threads() == max(1, torch.get_num_threads())


@pytest.mark.parametrize("name,value,match", [
    ("MEMPIPE_CPU_ATTN_THREADS", "-1", "auto or an integer >= 0, got '-1'"),
    ("MEMPIPE_CPU_ATTN_THREADS", "two", "auto or an integer >= 0, got 'two'"),
    ("MEMPIPE_CPU_ATTN_POOL", "omp", "one of torch, mempipe, got 'omp'"),
])
def test_backend_flags_reject_bad_values(backend, monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        backend.attention_threads()


def _selection_problem(gen):
    """A batch with built digests and a budget that forces a choice in most sequences."""
    batch, q, _, _ = _problem(gen, torch.float32, num_seqs=4)
    digests = torch.full((batch.kv_cache.shape[1], 2) + tuple(batch.kv_cache.shape[3:]),
                         float("nan"))
    mp.build_digests(batch.kv_cache, batch.block_table, batch.seq_lens, digests)
    return batch, q, digests, 6 * batch.kv_cache.shape[2]


def _select(kind, batch, q, digests, budget, threads):
    """compute_relevancy + select_pages, or score_and_select: (pages, counts, scores or None)."""
    n, kvh, width = batch.num_seqs, batch.kv_cache.shape[3], batch.block_table.shape[1]
    k = budget // batch.kv_cache.shape[2]
    pages = torch.full((n, kvh, k), 77, dtype=torch.int32)  # poison: every row must be written
    counts = torch.full((n, kvh), 77, dtype=torch.int32)
    scores = None
    if kind == "steps":
        scores = torch.full((n, kvh, width), float("nan"))
        mp.compute_relevancy(q, batch.kv_cache, digests, batch.block_table, batch.seq_lens, scores,
                             num_threads=threads)
        mp.select_pages(scores, batch.block_table, batch.seq_lens, batch.kv_cache.shape[2], pages,
                        counts, budget=budget, num_threads=threads)
    else:
        mp.score_and_select(q, batch.kv_cache, digests, batch.block_table, batch.seq_lens, pages,
                            counts, budget=budget, num_threads=threads)
    return pages, counts, scores


@pytest.mark.parametrize("kind", ["steps", "score_and_select"])
def test_selection_on_several_threads_gives_the_one_thread_selection(gen, kind):
    """Steps 2 and 3 take num_threads like decode (issue 16: in the serving path they ran on one
    thread while decode used them all): the same scores and pages for any count, on mempipe's
    pool and on torch's OpenMP team."""
    batch, q, digests, budget = _selection_problem(gen)
    pages, counts, scores = _select(kind, batch, q, digests, budget, 1)
    assert (counts != 77).all() and (pages != 77).all()
    # Not a trivial selection: the middle pages differ between the KV heads somewhere.
    assert any(not torch.equal(pages[s, 0], pages[s, h]) for s in range(batch.num_seqs)
               for h in range(1, pages.shape[1]))
    runtimes = ["pool", "team"] if TORCH_OPENMP else ["pool"]
    for runtime in runtimes:
        if runtime == "team":
            host_threads.use_torch_openmp()
        for threads in (2, 3, 64):
            before = host_threads.info()["team_calls"]
            got_pages, got_counts, got_scores = _select(kind, batch, q, digests, budget, threads)
            assert torch.equal(got_pages, pages) and torch.equal(got_counts, counts), threads
            if scores is not None:
                assert_bit_identical(got_scores, scores)
            if runtime == "team":
                assert host_threads.info()["team_calls"] > before, "not run on torch's team"


def test_selection_and_decode_refuse_fewer_than_one_thread(gen):
    batch, q, digests, budget = _selection_problem(gen)
    pages, counts, scores = _select("steps", batch, q, digests, budget, 1)
    out = torch.empty_like(q)
    calls = {
        "compute_relevancy": lambda t: mp.compute_relevancy(
            q, batch.kv_cache, digests, batch.block_table, batch.seq_lens, scores, num_threads=t),
        "select_pages": lambda t: mp.select_pages(
            scores, batch.block_table, batch.seq_lens, batch.kv_cache.shape[2], pages, counts,
            budget=budget, num_threads=t),
        "score_and_select": lambda t: mp.score_and_select(
            q, batch.kv_cache, digests, batch.block_table, batch.seq_lens, pages, counts,
            budget=budget, num_threads=t),
        "dense_decode": lambda t: mp.dense_decode(
            q, batch.kv_cache, batch.block_table, batch.seq_lens, out, 0.125, num_threads=t),
        "sparse_decode": lambda t: mp.sparse_decode(
            q, batch.kv_cache, batch.block_table, batch.seq_lens, pages, counts, out, 0.125,
            num_threads=t),
    }
    for name, call in calls.items():
        for bad in (0, -2):
            with pytest.raises(ValueError, match=f"num_threads must be >= 1, got {bad}"):
                call(bad)
        call(2)  # and a good count passes


def test_paged_layer_selects_on_its_decode_threads(gen, monkeypatch):
    """The CPU serving path (PagedLayer, which the vLLM and transformers adapters drive) gives
    score_select_decode, its sparse layer's one call (steps 2-4), the layer's host threads, and
    calls neither of the two-step functions."""
    from mempipe.attention import PagedLayer
    from mempipe.config import MempipeConfig
    batch, q, digests, budget = _selection_problem(gen)
    cfg = MempipeConfig(placement="cpu", budget=budget, page_size=batch.kv_cache.shape[2],
                        dense_layers=0)
    layer = PagedLayer(cfg, 0, q.shape[1], batch.kv_cache.shape[3], q.shape[2], 0.125)
    layer.num_threads = 3
    seen = {}
    for name in ("score_and_select", "sparse_decode", "score_select_decode"):
        original = getattr(mp, name)

        def wrapper(*args, _name=name, _original=original, **kw):
            seen[_name] = kw.get("num_threads")
            return _original(*args, **kw)
        monkeypatch.setattr(mp, name, wrapper)
    out = torch.full_like(q, float("nan"))
    layer.decode(q, batch.kv_cache, batch.block_table, batch.seq_lens, out, digests=digests)
    assert layer.calls["sparse"] == 1
    assert seen == {"score_select_decode": 3}
    assert not out.isnan().any()
