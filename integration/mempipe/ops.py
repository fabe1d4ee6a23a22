"""PyTorch custom operators (`torch.ops.mempipe.*`) for the four steps.

Each operator wraps one function of the C++ module; tensors are handed over through DLPack
without copies (on the host, the K/V rows of the writes may have any token stride, as vLLM's
slices of one fused qkv row per token: mempipe.attention.write_rows). In-place operators
declare what they mutate, so torch.compile and functionalization see the writes; functional
ones allocate their outputs and have fake (meta) kernels for tracing.

    import mempipe.ops  # registers torch.ops.mempipe.*
    torch.ops.mempipe.append_kv_and_digests(kv_cache, slot_mapping, key, value, digests)
    pages, counts = torch.ops.mempipe.score_and_select(q, kv_cache, digests, block_table,
                                                       seq_lens, 4096, 1, 1, "max")
    out = torch.ops.mempipe.sparse_decode(q, kv_cache, block_table, seq_lens, pages, counts, s)

Int8 digests (mempipe.digests, MEMPIPE_CONFIG digest_dtype=int8) are three tensors: the int8
codes, `digest_scales` and `digest_exact` (`mempipe.digests.op_args(d)` splits either form; both
None for native digests). The functional operators take them as optional arguments; the two that
write digests have an int8 twin with all three required (`append_kv_and_digests_int8`,
`build_digests_int8`: an optional argument that an operator mutates is not supported by every
torch release), and `mempipe.ops.build_digests_any` / `append_kv_and_digests_any` pick the one
that fits a digest of either form:

    mempipe.ops.build_digests_any(kv_cache, block_table, seq_lens, d)

Shapes are those of `mempipe._mempipe` (see bindings/module.cc). The same operators run on CPU
tensors and, in a build whose `mempipe.steps.devices` includes "cuda", on CUDA tensors (on
torch's current stream; GPU scratch memory comes from torch's caching allocator per call, use
mempipe.attention.DecodePlan for allocation-free steps). On CUDA, write_kv is a torch
index_copy (one host synchronization to drop negative slots) and prefill_attention is torch
SDPA over each sequence's gathered pages: the module has no GPU kernel for either. On the CPU
the steps that take `num_threads` (relevancy, selection, decode, prefill) run on
torch.get_num_threads() host threads; their results do not depend on the count.
"""

from __future__ import annotations

import torch

from mempipe import _mempipe
from mempipe.attention import write_rows
from mempipe.digests import from_op_args, op_args


def _threads() -> int:
    """Host threads of the C++ steps on CPU tensors: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor | None:
    if device.type != "cuda" or nbytes == 0:
        return None
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@torch.library.custom_op("mempipe::write_kv", mutates_args=("kv_cache",))
def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> None:
    if kv_cache.is_cuda:
        keep = (slot_mapping >= 0).nonzero().flatten()
        slots = slot_mapping.index_select(0, keep)
        kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        for plane, rows in ((0, key), (1, value)):
            kv_cache[plane].view(-1, kv_heads, head_dim).index_copy_(
                0, slots, rows.index_select(0, keep).to(kv_cache.dtype))
        return
    _mempipe.write_kv(kv_cache, slot_mapping, write_rows(kv_cache, key),
                      write_rows(kv_cache, value))


_DIGEST_ARGS = ("digests", "digest_scales", "digest_exact")


@torch.library.custom_op("mempipe::append_kv_and_digests", mutates_args=("kv_cache", "digests"))
def append_kv_and_digests(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, digests: torch.Tensor) -> None:
    _mempipe.append_kv_and_digests(kv_cache, slot_mapping, write_rows(kv_cache, key),
                                   write_rows(kv_cache, value), digests)


@torch.library.custom_op("mempipe::append_kv_and_digests_int8",
                         mutates_args=("kv_cache",) + _DIGEST_ARGS)
def append_kv_and_digests_int8(kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               key: torch.Tensor, value: torch.Tensor, digests: torch.Tensor,
                               digest_scales: torch.Tensor, digest_exact: torch.Tensor) -> None:
    _mempipe.append_kv_and_digests(kv_cache, slot_mapping, write_rows(kv_cache, key),
                                   write_rows(kv_cache, value),
                                   from_op_args(digests, digest_scales, digest_exact))


@torch.library.custom_op("mempipe::build_digests", mutates_args=("digests",))
def build_digests(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  digests: torch.Tensor) -> None:
    _mempipe.build_digests(kv_cache, block_table, seq_lens, digests)


@torch.library.custom_op("mempipe::build_digests_int8", mutates_args=_DIGEST_ARGS)
def build_digests_int8(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       digests: torch.Tensor, digest_scales: torch.Tensor,
                       digest_exact: torch.Tensor) -> None:
    _mempipe.build_digests(kv_cache, block_table, seq_lens,
                           from_op_args(digests, digest_scales, digest_exact))


def append_kv_and_digests_any(kv_cache, slot_mapping, key, value, digests) -> None:
    """torch.ops.mempipe.append_kv_and_digests[_int8] for a native or an Int8Digests digest."""
    codes, scales, exact = op_args(digests)
    if scales is None:
        torch.ops.mempipe.append_kv_and_digests(kv_cache, slot_mapping, key, value, codes)
    else:
        torch.ops.mempipe.append_kv_and_digests_int8(kv_cache, slot_mapping, key, value, codes,
                                                     scales, exact)


def build_digests_any(kv_cache, block_table, seq_lens, digests) -> None:
    """torch.ops.mempipe.build_digests[_int8] for a native or an Int8Digests digest."""
    codes, scales, exact = op_args(digests)
    if scales is None:
        torch.ops.mempipe.build_digests(kv_cache, block_table, seq_lens, codes)
    else:
        torch.ops.mempipe.build_digests_int8(kv_cache, block_table, seq_lens, codes, scales, exact)


@torch.library.custom_op("mempipe::compute_relevancy", mutates_args=())
def compute_relevancy(query: torch.Tensor, kv_cache: torch.Tensor, digests: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, aggregation: str,
                      digest_scales: torch.Tensor | None = None,
                      digest_exact: torch.Tensor | None = None) -> torch.Tensor:
    scores = torch.empty(block_table.shape[0], kv_cache.shape[3], block_table.shape[1],
                         dtype=torch.float32, device=query.device)
    _mempipe.compute_relevancy(query.contiguous(), kv_cache,
                               from_op_args(digests, digest_scales, digest_exact), block_table,
                               seq_lens, scores, aggregation=aggregation, num_threads=_threads())
    return scores


@compute_relevancy.register_fake
def _(query, kv_cache, digests, block_table, seq_lens, aggregation, digest_scales=None,
      digest_exact=None):
    return query.new_empty(block_table.shape[0], kv_cache.shape[3], block_table.shape[1],
                           dtype=torch.float32)


def _selection_buffers(num_seqs: int, num_kv_heads: int, max_selected: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pages = torch.empty(num_seqs, num_kv_heads, max_selected, dtype=torch.int32, device=device)
    counts = torch.empty(num_seqs, num_kv_heads, dtype=torch.int32, device=device)
    return pages, counts


@torch.library.custom_op("mempipe::select_pages", mutates_args=())
def select_pages(scores: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 block_size: int, budget: int, sinks: int,
                 locals: int) -> tuple[torch.Tensor, torch.Tensor]:
    pages, counts = _selection_buffers(scores.shape[0], scores.shape[1],
                                       max(budget // block_size, 1), scores.device)
    _mempipe.select_pages(scores, block_table, seq_lens, block_size, pages, counts,
                          budget=budget, sinks=sinks, locals=locals, num_threads=_threads())
    return pages, counts


@select_pages.register_fake
def _(scores, block_table, seq_lens, block_size, budget, sinks, locals):
    k = max(budget // block_size, 1)
    return (scores.new_empty(scores.shape[0], scores.shape[1], k, dtype=torch.int32),
            scores.new_empty(scores.shape[0], scores.shape[1], dtype=torch.int32))


@torch.library.custom_op("mempipe::score_and_select", mutates_args=())
def score_and_select(query: torch.Tensor, kv_cache: torch.Tensor, digests: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, budget: int, sinks: int,
                     locals: int, aggregation: str, digest_scales: torch.Tensor | None = None,
                     digest_exact: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    pages, counts = _selection_buffers(block_table.shape[0], kv_cache.shape[3],
                                       max(budget // kv_cache.shape[2], 1), query.device)
    ws = None
    if query.is_cuda:
        ws = _workspace(_mempipe.select_workspace_bytes(block_table.shape[0], kv_cache.shape[3],
                                                        block_table.shape[1]), query.device)
    _mempipe.score_and_select(query.contiguous(), kv_cache,
                              from_op_args(digests, digest_scales, digest_exact), block_table,
                              seq_lens, pages, counts, budget=budget, sinks=sinks, locals=locals,
                              aggregation=aggregation, num_threads=_threads(), workspace=ws)
    return pages, counts


@score_and_select.register_fake
def _(query, kv_cache, digests, block_table, seq_lens, budget, sinks, locals, aggregation,
      digest_scales=None, digest_exact=None):

    k = max(budget // kv_cache.shape[2], 1)
    n, h = block_table.shape[0], kv_cache.shape[3]
    return (query.new_empty(n, h, k, dtype=torch.int32),
            query.new_empty(n, h, dtype=torch.int32))


@torch.library.custom_op("mempipe::dense_decode", mutates_args=())
def dense_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    query = query.contiguous()
    out = torch.empty_like(query)
    ws = None
    if query.is_cuda:
        ws = _workspace(_mempipe.decode_workspace_bytes(
            query.shape[0], query.shape[1], kv_cache.shape[3], block_table.shape[1],
            device=query.device.index or 0), query.device)
    _mempipe.dense_decode(query, kv_cache, block_table, seq_lens, out, scale,
                          num_threads=_threads(), workspace=ws)
    return out


@torch.library.custom_op("mempipe::sparse_decode", mutates_args=())
def sparse_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, pages: torch.Tensor, counts: torch.Tensor,
                  scale: float) -> torch.Tensor:
    query = query.contiguous()
    out = torch.empty_like(query)
    ws = None
    if query.is_cuda:
        ws = _workspace(_mempipe.decode_workspace_bytes(
            query.shape[0], query.shape[1], kv_cache.shape[3], pages.shape[2],
            device=query.device.index or 0), query.device)
    _mempipe.sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
                           num_threads=_threads(), workspace=ws)
    return out


@torch.library.custom_op("mempipe::prefill_attention", mutates_args=())
def prefill_attention(query: torch.Tensor, query_start_loc: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float) -> torch.Tensor:
    query = query.contiguous()
    out = torch.empty_like(query)
    if query.is_cuda:
        from mempipe.attention import paged_prefill_sdpa
        paged_prefill_sdpa(query, query_start_loc, kv_cache, block_table, seq_lens, out, scale)
        return out
    _mempipe.prefill_attention(query, query_start_loc, kv_cache, block_table, seq_lens, out,
                               scale, num_threads=_threads())
    return out


for _op in (dense_decode, sparse_decode, prefill_attention):
    _op.register_fake(lambda query, *args: torch.empty_like(query))
for _op in (write_kv, append_kv_and_digests, append_kv_and_digests_int8, build_digests,
            build_digests_int8):
    _op.register_fake(lambda *args: None)
