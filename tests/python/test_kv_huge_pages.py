"""Huge pages for the host KV cache (core/huge_pages.h, `_mempipe.back_with_huge_pages`, and the
vLLM backend's MEMPIPE_KV_HUGE_PAGES): every byte kept, the storage backed by 2 MiB pages where
the kernel allows it, once per storage, a refusal a warning and never an error. Random contents
from the test's fresh seed."""

import pathlib

import pytest
import torch

from mempipe import _mempipe as mp

HUGE = 2 << 20


def _thp_mode() -> str:
    """THP's system mode ("always", "madvise", "never"), or "" without THP."""
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


needs_thp = pytest.mark.skipif(_thp_mode() in ("", "never"),
                               reason=f"THP mode {_thp_mode()!r}: no huge pages to collapse into")


def _random_cache(gen, nbytes=20 * HUGE + 12345):
    """A host buffer as vLLM's KV cache is: allocated, then written (every page faulted in)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
    return t


def _interior(t):
    s = t.untyped_storage()
    lo, hi = s.data_ptr(), s.data_ptr() + s.nbytes()
    return ((hi // HUGE) - (-(-lo // HUGE))) * HUGE


@needs_thp
def test_collapse_keeps_every_byte_and_backs_the_interior(gen):
    t = _random_cache(gen)
    copy = t.clone()
    s = t.untyped_storage()
    r = mp.back_with_huge_pages(s.data_ptr(), s.nbytes(), mode="collapse")
    assert torch.equal(t, copy)
    assert r["advised_bytes"] == _interior(t) >= 19 * HUGE
    assert r["huge_after"] >= r["advised_bytes"] and r["incomplete"] == ""
    assert mp.huge_page_bytes(s.data_ptr(), s.nbytes()) == r["huge_after"]
    # The measure is not a constant: a 4 KiB-paged buffer of the same size reads as less.
    other = _random_cache(gen)
    o = other.untyped_storage()
    assert mp.huge_page_bytes(o.data_ptr(), o.nbytes()) < r["huge_after"] or _thp_mode() == "always"


def test_bad_mode_is_named():
    t = torch.zeros(HUGE * 2, dtype=torch.uint8)
    s = t.untyped_storage()
    with pytest.raises(ValueError, match='got "sometimes"'):
        mp.back_with_huge_pages(s.data_ptr(), s.nbytes(), mode="sometimes")


# ---- the vLLM backend ------------------------------------------------------------------------


@pytest.fixture
def backend(monkeypatch):
    from vllm_support import require_vllm
    require_vllm()
    from mempipe.vllm import backend as b
    monkeypatch.delenv("MEMPIPE_KV_HUGE_PAGES", raising=False)
    monkeypatch.setattr(b, "_HUGE_PAGED", set())
    return b


def test_backend_mode_default_and_bad_value(backend, monkeypatch):
    assert backend.kv_huge_page_mode() == "collapse"
    monkeypatch.setenv("MEMPIPE_KV_HUGE_PAGES", "advise")
    assert backend.kv_huge_page_mode() == "advise"
    monkeypatch.setenv("MEMPIPE_KV_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="one of collapse, advise, off, got 'yes'"):
        backend.kv_huge_page_mode()


@needs_thp
def test_backend_collapses_a_storage_once_and_keeps_it(backend, gen):
    t = _random_cache(gen)
    copy = t.clone()
    layer_view = t[HUGE:5 * HUGE]  # a layer's cache is a view into the one storage
    r = backend.back_kv_with_huge_pages(layer_view, "collapse")
    assert r is not None and r["huge_after"] >= _interior(t)  # the whole storage, not the view
    assert backend.back_kv_with_huge_pages(t, "collapse") is None  # once per storage
    assert torch.equal(t, copy)


def test_backend_off_does_nothing(backend, gen):
    t = _random_cache(gen)
    assert backend.back_kv_with_huge_pages(t, "off") is None
    assert not backend._HUGE_PAGED


def test_backend_refusal_is_a_warning_not_an_error(backend, gen, monkeypatch, caplog):
    class Refusing:
        @staticmethod
        def back_with_huge_pages(*_, **__):
            raise ValueError("madvise(MADV_COLLAPSE) failed: EINVAL (test)")
    monkeypatch.setattr(backend, "_mempipe", Refusing)
    t = _random_cache(gen)
    copy = t.clone()
    records = []
    monkeypatch.setattr(backend.logger, "warning", lambda *a: records.append(a[0] % a[1:]))
    assert backend.back_kv_with_huge_pages(t, "collapse") is None
    assert torch.equal(t, copy)
    assert len(records) == 1 and "EINVAL (test)" in records[0], records
