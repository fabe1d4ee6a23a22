"""Huge pages for vLLM's host KV cache (core/huge_pages.h, issue 16): every byte kept, zero
chunks given back to fault in as huge pages, the backend's flag and its once-per-cache call."""

from pathlib import Path

import pytest
import torch

from mempipe import _mempipe as mp

MIB2 = 2 << 20


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")]


needs_thp = pytest.mark.skipif(thp_mode() in ("", "never"), reason="no transparent huge pages")


def chunked_cache(gen, chunks: int, data_chunks: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 tensor of `chunks` 2 MiB chunks (plus slack), zero-filled like vLLM's cache,
    random data in `data_chunks` (counted from its first whole chunk); returns (the chunks' view,
    the view from the tensor's first whole chunk)."""
    slack = MIB2 // 4
    t = torch.zeros((chunks + 1) * MIB2 // 4)
    first = (-t.data_ptr() % MIB2) // 4  # floats to the first 2 MiB boundary
    view = t[first:first + chunks * slack]
    for c in data_chunks:
        view[c * slack:(c + 1) * slack] = torch.randn(slack, generator=gen)
    return t, view


@needs_thp
def test_module_keeps_every_byte_and_releases_only_zero_chunks(gen):
    t, view = chunked_cache(gen, 6, {1, 4})
    view[3 * MIB2 // 4 + 77] = 1.5  # one nonzero float in an otherwise zero chunk
    before = t.clone()
    a = mp.advise_huge_pages(view.data_ptr(), view.numel() * 4)
    assert a["advised_bytes"] == 6 * MIB2
    assert a["released_bytes"] == 3 * MIB2  # chunks 0, 2, 5
    assert a["collapsed_bytes"] + a["failed_bytes"] == 3 * MIB2  # 1, 3, 4
    assert torch.equal(t, before)
    view.fill_(2.0)  # the released chunks fault in again, as huge pages
    assert mp.huge_page_bytes(view.data_ptr(), view.numel() * 4) >= MIB2


def test_module_rejects_a_null_range():
    with pytest.raises(ValueError, match="null data with bytes 4096"):
        mp.advise_huge_pages(0, 4096)


# ---- the vLLM backend ----------------------------------------------------------------------


@pytest.fixture
def backend(monkeypatch):
    from vllm_support import require_vllm
    require_vllm()
    from mempipe.vllm import backend as b
    monkeypatch.delenv("MEMPIPE_CPU_HUGE_PAGES", raising=False)
    return b


@needs_thp
def test_backend_advises_the_cache_span_and_honours_the_flag(backend, gen, monkeypatch):
    _, view = chunked_cache(gen, 4, {2})
    cache = view.view(-1, 2, 8, 128)  # a vLLM-shaped layer cache over the four chunks
    before = cache.clone()
    a = backend.advise_cache_huge_pages(cache)
    assert a["advised_bytes"] == 4 * MIB2 and a["released_bytes"] == 3 * MIB2
    assert torch.equal(cache, before)
    monkeypatch.setenv("MEMPIPE_CPU_HUGE_PAGES", "0")
    assert backend.advise_cache_huge_pages(cache) is None
    monkeypatch.setenv("MEMPIPE_CPU_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="MEMPIPE_CPU_HUGE_PAGES must be 0 or 1, got 'yes'"):
        backend.advise_cache_huge_pages(cache)


def test_backend_cache_view_advises_each_cache_tensor_once(backend, monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config
    calls = []
    real = backend._mempipe.advise_huge_pages

    def spy(address, nbytes):
        calls.append((address, nbytes))
        return real(address, nbytes)
    monkeypatch.setattr(backend._mempipe, "advise_huge_pages", spy)
    monkeypatch.setenv("MEMPIPE_CONFIG", "page_size=16")
    with set_current_vllm_config(VllmConfig()):
        impl = backend.MempipeAttentionImpl(4, 64, 0.125, 2)
    cache = torch.zeros(40, 2, 16, 128)  # [blocks, KVH, page, 2 * D]
    impl._cache_view(cache)
    impl._cache_view(cache)
    assert calls == [(cache.data_ptr(), cache.numel() * 4)]
    other = torch.zeros(40, 2, 16, 128)
    impl._cache_view(other)
    assert calls[1:] == [(other.data_ptr(), other.numel() * 4)]
    monkeypatch.setenv("MEMPIPE_CPU_HUGE_PAGES", "0")
    impl._cache_view(torch.zeros(40, 2, 16, 128))
    assert len(calls) == 2
