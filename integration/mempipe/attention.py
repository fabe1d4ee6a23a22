"""One layer of mempipe attention over a paged KV cache, framework-neutral (torch tensors).

The vLLM backend (mempipe.vllm.backend) and the transformers adapter (mempipe.hf) both drive
this class; it holds the layer's digests (in the configuration's digest_dtype: native, or
int8 codes + per-page scales, mempipe.digests) and runs, per call:


    append  keys/values into the cache and widen the page digests       (step 1, incremental)
    decode  for one-token queries: score pages (2), select top-k (3), attend to them (4);
            dense attention when the layer is dense or the placement is `dense`
    prefill causal attention over the cache for multi-token queries (always dense)

    plan = DecodePlan()                      # one per model (or per vLLM builder)
    layer = PagedLayer(config, layer_index=5, num_heads=32, num_kv_heads=8, head_dim=128,
                       scale=128 ** -0.5, plan=plan)
    layer.append(kv_cache, slot_mapping, key, value)
    layer.decode(query, kv_cache, block_table, seq_lens, out)

Tensors (contiguous; all on the CPU, or all on one CUDA device):
    kv_cache     [2, num_blocks, block_size, num_kv_heads, head_dim]; on the CPU also a
                 head-major view, t.permute(0, 1, 3, 2, 4) of a contiguous
                 [2, num_blocks, num_kv_heads, block_size, head_dim] t, or a page-major one,
                 t.permute(2, 0, 3, 1, 4) of a contiguous
                 [num_blocks, num_kv_heads, 2, block_size, head_dim] t (config kv_layout,
                 layout_view)
    slot_mapping [T] int64;  key, value [T, num_kv_heads, head_dim]
    block_table  [S, max_blocks] int32;  seq_lens [S] int32
    query, out   [S, num_heads, head_dim] (decode) or [T, num_heads, head_dim] (prefill)

On CUDA tensors every step runs on the GPU, on torch's current stream, without a host
synchronization on the decode path: the fused append + digest kernel, the fused score + top-k
kernel and the paged decode kernels, with their scratch memory (selection, workspaces) taken
from the DecodePlan, which allocates it once for the largest batch it has seen and hands every
layer views of the same buffers (FlashInfer's plan-once, run-per-layer). Buffers keep their
addresses while shapes do not grow, so a decode step can be captured in a CUDA graph after
`plan.reserve(max_seqs, max_blocks, ...)`. Prefill on CUDA is torch SDPA over the sequence's
pages gathered into a contiguous [kv_heads, len, head_dim] (causal, offset for chunked
prefill); it reads host-side lengths, so prefill synchronizes once per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mempipe import _mempipe
from mempipe import digests as digest_store
from mempipe import schemes
from mempipe import config as mempipe_config
from mempipe.config import MempipeConfig


class DecodePlan:
    """Scratch buffers of one decode step, shared by every layer on one device.

    `views(...)` returns (pages, counts, select_workspace, decode_workspace) for a batch; the
    buffers grow (a new allocation) only when a batch needs more than any before it, and are
    otherwise the same memory every call, every layer, every step. CPU tensors get pages and
    counts only (the CPU code needs no workspace).
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._sizes: dict[tuple, tuple[int, int]] = {}
        self._views: dict[tuple, tuple] = {}
        self.device: torch.device | None = None
        self.allocations = 0  # how many times a buffer was (re)allocated, for tests
        # The schemes (mempipe.schemes): one state per configuration, one SelectionOffload per
        # card setting (placement fpga), and each model layer's id on that card.
        self.offload_slots = schemes.DEFAULT_SLOTS
        self._schemes: dict = {}
        self._offloads: dict = {}
        self._card_layers: dict = {}
        self._card_next: dict = {}
        self._slots: dict = {}

    def schemes(self, config: MempipeConfig) -> schemes.SchemeState:
        st = self._schemes.get(config)
        if st is None:
            st = self._schemes[config] = schemes.SchemeState(self, config)
        return st

    def offload(self, config: MempipeConfig, device: torch.device):
        """The plan's SelectionOffload for `config`'s card settings on `device` (made once)."""
        key = schemes.offload_key(config, device)
        off = self._offloads.get(key)
        if off is None:
            off = self._offloads[key] = schemes.make_offload(config, device, self.offload_slots)
        return off

    def offload_slot(self, config: MempipeConfig, device: torch.device, key: tuple) -> int:
        """A fixed slot of the engine for `key` (one request in flight per key)."""
        okey = schemes.offload_key(config, device)
        slots = self._slots.setdefault(okey, {})
        slot = slots.get(key)
        if slot is None:
            slot = len(slots)
            if slot >= self.offload_slots:
                raise ValueError(f"mempipe: the selection-offload engine has "
                                 f"{self.offload_slots} slots and this model needs more "
                                 f"({key[1:]}); set DecodePlan.offload_slots before the first "
                                 "step")
            slots[key] = slot
        return slot

    def card_layer(self, config: MempipeConfig, layer: int,
                   kv_cache: torch.Tensor) -> tuple[int, bool]:
        """(id of `layer` on the card, True when just registered). A layer whose cache tensor
        changed (a new allocation, e.g. the transformers cache growing) gets a new id with the
        new geometry; the caller then rebuilds its digests there (build_digests). The card
        stores the layer's digests in `config.digest_dtype` (native or int8)."""
        okey = schemes.offload_key(config, kv_cache.device)
        ckey = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype, config.digest_dtype)
        hit = self._card_layers.get((okey, layer))
        if hit is not None and hit[1] == ckey:
            return hit[0], False
        card_id = self._card_next.get(okey, 0)
        self._card_next[okey] = card_id + 1
        self.offload(config, kv_cache.device).add_layer(card_id, kv_cache,
                                                        digest_dtype=config.digest_dtype)
        self._card_layers[(okey, layer)] = (card_id, ckey)
        return card_id, True

    def shutdown(self) -> None:
        """Drains and stops every SelectionOffload of this plan (idempotent)."""
        for off in self._offloads.values():
            off.shutdown()

    def _buffer(self, name: str, numel: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buf
            self.allocations += 1
        return buf[:numel]

    def _workspace_sizes(self, num_seqs: int, num_heads: int, num_kv_heads: int,
                         max_blocks: int, max_selected: int, device: torch.device):
        key = (num_seqs, num_heads, num_kv_heads, max_blocks, max_selected, device.index)
        sizes = self._sizes.get(key)
        if sizes is None:
            dev = device.index or 0
            decode = max(
                _mempipe.decode_workspace_bytes(num_seqs, num_heads, num_kv_heads, max_blocks,
                                                device=dev),
                _mempipe.decode_workspace_bytes(num_seqs, num_heads, num_kv_heads,
                                                max_selected, device=dev))
            select = _mempipe.select_workspace_bytes(num_seqs, num_kv_heads, max_blocks)
            sizes = self._sizes[key] = (select, decode)
        return sizes

    def views(self, num_seqs: int, num_heads: int, num_kv_heads: int, max_blocks: int,
              max_selected: int, device: torch.device):
        key = (num_seqs, num_heads, num_kv_heads, max_blocks, max_selected, device)
        hit = self._views.get(key)
        if hit is not None and hit[0] == self.allocations:
            return hit[1]  # NOTE: the per-layer fast path: no slicing, no dict building
        views = self._make_views(num_seqs, num_heads, num_kv_heads, max_blocks, max_selected,
                                 device)
        self._views[key] = (self.allocations, views)
        return views

    def _make_views(self, num_seqs, num_heads, num_kv_heads, max_blocks, max_selected, device):
        pages = self._buffer("pages", num_seqs * num_kv_heads * max_selected, torch.int32,
                             device).view(num_seqs, num_kv_heads, max_selected)
        counts = self._buffer("counts", num_seqs * num_kv_heads, torch.int32,
                              device).view(num_seqs, num_kv_heads)
        if device.type != "cuda":
            return pages, counts, None, None
        select, decode = self._workspace_sizes(num_seqs, num_heads, num_kv_heads, max_blocks,
                                               max_selected, device)
        return (pages, counts, self._buffer("select_ws", select, torch.uint8, device),
                self._buffer("decode_ws", decode, torch.uint8, device))

    def append_workspace(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """Scratch of append_kv_and_digests on a CUDA cache (None on the CPU).

        One buffer for every layer (appends on one stream run one at a time), sized for the
        largest cache seen, so a captured CUDA graph keeps its address.
        """
        if not kv_cache.is_cuda:
            return None
        num_blocks = kv_cache.shape[1]
        key = ("append", num_blocks, kv_cache.device)
        hit = self._views.get(key)
        if hit is not None and hit[0] == self.allocations:
            return hit[1]
        ws = self._buffer("append_ws", _mempipe.append_workspace_bytes(num_blocks), torch.uint8,
                          kv_cache.device)
        self._views[key] = (self.allocations, ws)
        return ws

    def reserve(self, num_seqs: int, num_heads: int, num_kv_heads: int, max_blocks: int,
                max_selected: int, device: torch.device | str) -> None:
        """Allocates for the largest batch up front (before capturing a CUDA graph)."""
        self.views(num_seqs, num_heads, num_kv_heads, max_blocks, max_selected,
                   torch.device(device))


_DEFAULT_PLANS: dict[torch.device, DecodePlan] = {}


def packed_heads(rows: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, D] rows whose heads are packed (each token's heads * D elements
    contiguous): as they are, whatever the token stride (the host write and vLLM's CPU kernels
    take it); otherwise a copy."""
    _, kvh, d = rows.shape
    if (d == 1 or rows.stride(2) == 1) and (kvh == 1 or rows.stride(1) == d):
        return rows
    return rows.contiguous()


def write_rows(kv_cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, D] K or V rows as the module's KV write takes them for `kv_cache`: on the
    host as they are where their heads are packed, whatever the token stride (vLLM's column
    slices of one fused qkv row per token are read in place; packed_heads), on a GPU
    C-contiguous (the CUDA append reads packed rows)."""
    return rows.contiguous() if kv_cache.is_cuda else packed_heads(rows)


def default_plan(device: torch.device) -> DecodePlan:
    """The process-wide plan of `device` (used by layers created without one)."""
    plan = _DEFAULT_PLANS.get(device)
    if plan is None:
        plan = _DEFAULT_PLANS[device] = DecodePlan()
    return plan


class PagedLayer:
    def __init__(self, config: MempipeConfig, layer_index: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, scale: float, plan: DecodePlan | None = None):
        reasons = config.validate()
        if reasons:
            raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
        self.config = config
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = float(scale)
        self.sparse = config.layer_sparse(layer_index)
        self.plan = plan
        # Attention (step 4) shares its (chunk of a sequence, KV head) pairs (attention/decode.h)
        # among as many host threads as torch uses, which vLLM's CPU worker sets to the cores
        # it binds.
        self.num_threads = max(1, torch.get_num_threads())
        self._digests: digest_store.Digests | None = None
        self._digests_key: tuple | None = None
        self._digests_cache: torch.Tensor | None = None  # the cache object of _digests_key
        # A layer that reads another layer's KV cache (vLLM's kv_sharing_target_layer_name)
        # scores with that layer's digests; the target keeps digests even when it is dense.
        self.digest_source: PagedLayer | None = None
        self.keep_digests = False
        # Calls per path, for tests and for counting what ran where; "covered" (a sparse layer's
        # decode that ran the dense kernel because the budget covered every context, decode())
        # appears once it happens.
        self.calls = {"sparse": 0, "dense": 0, "prefill": 0}

    def _plan(self, device: torch.device) -> DecodePlan:
        return self.plan if self.plan is not None else default_plan(device)

    def digests(self, kv_cache: torch.Tensor) -> digest_store.Digests:
        """The digests of `kv_cache` in the configuration's digest_dtype (mempipe.digests):
        native, [num_blocks, 2, num_kv_heads, head_dim] in the cache dtype, or an Int8Digests
        (int8 codes + one fp32 scale per page and KV head + the exact max/min they are
        re-quantized from).

        Allocated on first use and kept for the cache's lifetime (a new cache tensor, e.g.
        after vLLM re-allocates, gets new digests). A page is only scored after a token was
        appended to it, which resets its digest first. On a device unwritten pages are
        poisoned (NaN); on the host they are zeros from a mapping the OS fills on first write
        (mempipe.digests.empty, poison=False), so that blocks never used cost neither memory
        nor a first touch in the first request.
        """
        if self.digest_source is not None:
            return self.digest_source.digests(kv_cache)
        if kv_cache is self._digests_cache:  # NOTE: per-call fast path (the same cache object)
            return self._digests
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype)
        if self._digests is None or self._digests_key != key:
            self._digests = digest_store.for_cache(kv_cache, self.config.digest_dtype,
                                                   poison=kv_cache.device.type != "cpu")
            self._digests_key = key
        self._digests_cache = kv_cache
        return self._digests

    def append(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, digests: digest_store.Digests | None = None) -> None:
        """Writes the new tokens and keeps the digests current (only sparse layers need them).

        On CUDA every layer takes the fused append + digest kernel (the GPU build has no bare
        write kernel; a dense layer's digests are kept and never read). With placement `fpga`
        the new keys of a sparse layer also go to the card (SelectionOffload.append, stream-
        ordered); the local digests are the fallback's copy (fpga_fallback=gpu; on the host they
        are skipped with fpga_fallback=dense).
        """
        key, value = write_rows(kv_cache, key), write_rows(kv_cache, value)
        fpga = self.config.placement == "fpga"
        local = self.sparse or self.keep_digests
        if fpga and self.config.fpga_fallback == "dense":
            local = self.keep_digests
        if kv_cache.is_cuda:
            # The plan's workspace: fixed addresses, so a CUDA graph can capture the append.
            _mempipe.append_kv_and_digests(kv_cache, slot_mapping, key, value,
                                           digests if digests is not None
                                           else self.digests(kv_cache),
                                           workspace=self._plan(kv_cache.device)
                                           .append_workspace(kv_cache))
        elif local:
            _mempipe.append_kv_and_digests(kv_cache, slot_mapping, key, value,
                                           digests if digests is not None
                                           else self.digests(kv_cache))
        else:
            _mempipe.write_kv(kv_cache, slot_mapping, key, value)
        if fpga and (self.sparse or self.keep_digests) and self.digest_source is None:
            plan = self._plan(kv_cache.device)
            card_id, _ = plan.card_layer(self.config, self.layer_index, kv_cache)
            plan.offload(self.config, kv_cache.device).append(card_id, slot_mapping,
                                                              key.contiguous())

    def card_build(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor) -> None:
        """Placement fpga: the card's digests of this layer built in bulk from `kv_cache` (after
        a prompt written without append(), or a new cache tensor). A no-op otherwise."""
        if self.config.placement != "fpga" or not (self.sparse or self.keep_digests):
            return
        plan = self._plan(kv_cache.device)
        card_id, _ = plan.card_layer(self.config, self.layer_index, kv_cache)
        plan.offload(self.config, kv_cache.device).build_digests(card_id, kv_cache, block_table,
                                                                 seq_lens)

    def _check_placement(self, device: torch.device) -> None:
        if self.config.placement == "fpga":
            return  # the engine's CUDA or CPU mode, as the tensors are
        want = "gpu" if device.type == "cuda" else "cpu"
        if self.sparse and self.config.placement != want:
            raise ValueError(f"placement '{self.config.placement}' does not run tensors on "
                             f"{device}: use placement={want} or fpga (or dense)")

    def decode(self, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, out: torch.Tensor,
               digests: digest_store.Digests | None = None,
               lookahead_query: torch.Tensor | None = None,
               max_seq_len: int | None = None) -> None:
        """One query token per sequence: sparse (steps 2-4) or dense. Writes `out`.

        `max_seq_len`: an upper bound of `seq_lens` the caller knows on the host (vLLM's
        CommonAttentionMetadata.max_seq_len), or None. On host tensors in the plain path, a
        sparse layer whose budget covers it (max_seq_len <= budget: every sequence has at most
        budget / page_size pages, so the selection would be every page) runs the dense kernel
        instead of scoring, selecting and attending to all pages (calls["covered"]): the same
        attention, without the scan and the page lists. Not on CUDA tensors, where a captured
        graph would replay the path chosen for the capture's lengths.

        The schemes of the configuration (mempipe.config): placement fpga (the card selects,
        the decode device waits stream-ordered and falls back by predicate), pipelined
        micro-batches, reuse (sync or async, extended to the newest page) and look-ahead (the
        next layer's digests scored while this layer runs, for it). `lookahead_query`
        [S, num_heads, head_dim] (lookahead=true, lookahead_query=projected): the next layer's
        query speculated by the model code from this layer's input hidden state (the next
        layer's RMSNorm, W_q and RoPE); required whenever the next layer is sparse.
        """
        self._check_placement(query.device)
        query = query.contiguous()
        c = self.config
        simple = c.placement != "fpga" and c.mode == "sync" and c.reuse == 1 and not c.lookahead
        if simple:  # the plain path (no model-level state)
            num_seqs, max_blocks = block_table.shape
            max_selected = c.budget // c.page_size
            pages, counts, select_ws, decode_ws = self._plan(query.device).views(
                num_seqs, self.num_heads, self.num_kv_heads, max_blocks, max_selected,
                query.device)
            covered = (self.sparse and max_seq_len is not None and max_seq_len <= c.budget
                       and query.device.type == "cpu")
            if not self.sparse or covered:
                path = "covered" if covered else "dense"
                self.calls[path] = self.calls.get(path, 0) + 1
                _mempipe.dense_decode(query, kv_cache, block_table, seq_lens, out, self.scale,
                                      num_threads=self.num_threads, workspace=decode_ws)
                return
            self.calls["sparse"] += 1
            dg = digests if digests is not None else self.digests(kv_cache)
            if query.device.type == "cpu":  # steps 2-4 in one call on the host threads
                _mempipe.score_select_decode(query, kv_cache, dg, block_table, seq_lens, pages,
                                             counts, out, self.scale, budget=c.budget,
                                             sinks=c.sinks, locals=c.locals,
                                             aggregation=c.aggregation,
                                             num_threads=self.num_threads)
                return
            _mempipe.score_and_select(query, kv_cache, dg, block_table, seq_lens, pages, counts,
                                      budget=c.budget, sinks=c.sinks, locals=c.locals,
                                      aggregation=c.aggregation, num_threads=self.num_threads,
                                      workspace=select_ws)
            _mempipe.sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out,
                                   self.scale, num_threads=self.num_threads, workspace=decode_ws)
            return
        schemes.SchemeDecode(self, query, kv_cache, block_table, seq_lens, out, digests,
                             lookahead_query).run()

    def prefill(self, query: torch.Tensor, query_start_loc: torch.Tensor,
                kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                out: torch.Tensor) -> None:
        """Causal attention of each sequence's new tokens over its cache (dense)."""
        self.calls["prefill"] += 1
        if kv_cache.is_cuda:
            paged_prefill_sdpa(query, query_start_loc, kv_cache, block_table, seq_lens, out,
                               self.scale)
            return
        _mempipe.prefill_attention(query.contiguous(), query_start_loc, kv_cache, block_table,
                                   seq_lens, out, self.scale, num_threads=self.num_threads)


# Set on a head_kt / page_kt view (layout_view): its K pages are [head_dim / x, page, x], which
# no strides can say; the module reads the mark (bindings/module.cc, kKeysTransposedAttr). Views
# derived from the marked one (slices, index_select) do not carry it: hand the module the view
# layout_view returned.
KEYS_TRANSPOSED_ATTR = "_mempipe_keys_transposed"


def layout_view(region: torch.Tensor, num_blocks: int, page: int, kv_heads: int, head_dim: int,
                layout: str) -> torch.Tensor:
    """The KV cache [2, num_blocks, page, kv_heads, head_dim] as a view of `region`, contiguous
    memory of that many elements laid out as `layout` says (config kv_layout): "token" the
    same shape; "head" [2, num_blocks, kv_heads, page, head_dim]; "page" [num_blocks, kv_heads,
    2, page, head_dim]; "head_kt" and "page_kt" head's and page's memory with each K page
    transposed, [head_dim / x, page, x] with x channels of 4 bytes. The host steps recognise the
    layout from the view's strides, and the transposed K pages from the view's mark
    (KEYS_TRANSPOSED_ATTR): its K elements, read through torch, are not the keys (logical_keys
    reads them)."""
    mempipe_config.require_kv_layout(layout)
    base = layout.removesuffix("_kt")
    if base == "head":
        view = region.view(2, num_blocks, kv_heads, page, head_dim).permute(0, 1, 3, 2, 4)
    elif base == "page":
        view = region.view(num_blocks, kv_heads, 2, page, head_dim).permute(2, 0, 3, 1, 4)
    else:
        return region.view(2, num_blocks, page, kv_heads, head_dim)
    if layout != base:
        setattr(view, KEYS_TRANSPOSED_ATTR, True)
    return view


def keys_transposed(kv_cache: torch.Tensor) -> bool:
    """Whether kv_cache is a head_kt / page_kt view (layout_view's mark)."""
    return bool(getattr(kv_cache, KEYS_TRANSPOSED_ATTR, False))


def logical_keys(kv_cache: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """K of the given physical blocks (all if None) as [len(blocks), page, kv_heads, head_dim]
    in any layout: kv_cache[0][blocks] itself, or for a head_kt / page_kt view its transposed
    pages [head_dim / x, page, x] read back (a copy)."""
    k = kv_cache[0]
    if not keys_transposed(kv_cache):
        return k if blocks is None else k.index_select(0, blocks.long())
    _, num_blocks, page, kv_heads, head_dim = kv_cache.shape
    x = 4 // kv_cache.element_size()
    # The K plane's memory per block and KV head: [head_dim / x, page, x] where the view has
    # [page, head_dim]; the block and head strides are the view's own.
    raw = k.as_strided((num_blocks, kv_heads, head_dim // x, page, x),
                       (k.stride(0), k.stride(2), page * x, x, 1))
    if blocks is not None:
        raw = raw.index_select(0, blocks.long())
    return raw.permute(0, 3, 1, 2, 4).contiguous().view(raw.shape[0], page, kv_heads, head_dim)


def poisoned_cache(num_blocks: int, page: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device | str,
                   layout: str = "token") -> torch.Tensor:
    """A NaN-poisoned KV cache [2, num_blocks, page, kv_heads, head_dim] laid out as `layout`
    says (layout_view) on the host; contiguous ("token") on CUDA, whose kernels read that one."""
    mempipe_config.require_kv_layout(layout)
    if torch.device(device).type != "cpu":
        layout = "token"
    region = torch.full((2 * num_blocks * page * kv_heads * head_dim,), float("nan"), dtype=dtype,
                        device=device)
    return layout_view(region, num_blocks, page, kv_heads, head_dim, layout)


def logical_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """A copy of the cache as [2, num_blocks, page, kv_heads, head_dim] in logical order, any
    layout (head_kt / page_kt K read back through logical_keys)."""
    return torch.stack([logical_keys(kv_cache), kv_cache[1]])


def gather_context(kv_cache: torch.Tensor, block_row: torch.Tensor,
                   length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V as [kv_heads, length, head_dim], gathered from its pages."""
    block_size = kv_cache.shape[2]
    pages = -(-length // block_size)
    ids = block_row[:pages].long()
    k = logical_keys(kv_cache, ids).flatten(0, 1)[:length]
    v = kv_cache[1].index_select(0, ids).flatten(0, 1)[:length]
    return k.transpose(0, 1), v.transpose(0, 1)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., H, n, D] attends causally to k, v [..., KVH, L, D] whose last n positions are
    q's (4-D inputs select the same fused SDPA kernels as transformers' sdpa path)."""
    n, length = q.shape[-2], k.shape[-2]
    if n == length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=True)
    rows = torch.arange(length - n, length, device=q.device).unsqueeze(1)
    mask = torch.arange(length, device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def paged_prefill_sdpa(query: torch.Tensor, query_start_loc: torch.Tensor,
                       kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """prefill_attention with torch SDPA: per sequence, its pages gathered, causal offset."""
    starts = query_start_loc.tolist()  # NOTE: host lengths; prefill synchronizes once
    lens = seq_lens.tolist()
    for s, length in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b == a:
            continue
        k, v = gather_context(kv_cache, block_table[s], length)
        q = query[a:b].transpose(0, 1)  # [H, n, D]
        out[a:b] = sdpa_causal(q[None], k[None], v[None], scale)[0].transpose(0, 1)
