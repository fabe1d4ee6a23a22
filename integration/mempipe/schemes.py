"""Model-level state of the selection schemes: the `fpga` placement's SelectionOffload, reuse,
pipelined micro-batches and cross-layer look-ahead (issue 11). Used by mempipe.attention.

One `SchemeState` per (DecodePlan, configuration): the plan is shared by every layer of a model
(or a vLLM builder), so this is the model-level object the layers share:

    offload       the `_mempipe.SelectionOffload` of the `fpga` placement (one per plan and card
                  settings; created on first use): keys go to the card in `append`, queries in
                  `submit`, selections come back with a stream-ordered `wait`
    selections    per layer, the selection kept across steps for `reuse > 1` (pages, counts and
                  what it was made for: each row's first block and length)
    lookahead     per target layer, the selection its predecessor submitted (or computed),
                  scored with the target's query speculated by the model code
                  (lookahead_query=projected) or with the predecessor's own (same)
    registry      per layer, the newest (kv_cache, digests, block_table) the layer decoded with:
                  look-ahead and the GPU fallback score another layer's digests with them
    counters      device-resident counts (stale reuse rows replaced) and host counts per path

Nothing here synchronizes with the GPU on the decode path: flags are int32 device tensors
consumed by the kernels' `when_zero` / `when_nonzero` predicates; host counters count calls,
which the host knows without looking at device memory. `selection_recall` (profiling only)
reads selections back.
"""

from __future__ import annotations

import dataclasses

import torch

from mempipe import _mempipe

# Slots of the engine's ring: one per (layer, micro-batch, purpose) in flight at a time.
DEFAULT_SLOTS = 256


def has_offload() -> bool:
    return hasattr(_mempipe, "SelectionOffload")


def micro_batches(num_seqs: int, config) -> list[tuple[int, int]]:
    """[(begin, end)) row ranges of the pipelined mode's micro-batches (one range in sync)."""
    m = max(1, min(config.micro_batches if config.mode == "pipelined" else 1, num_seqs))
    base, extra = divmod(num_seqs, m)
    out, b = [], 0
    for i in range(m):
        e = b + base + (1 if i < extra else 0)
        out.append((b, e))
        b = e
    return out


def extra_pages(config) -> int:
    """Room a reused selection needs past its budget for the pages the sequences grow into."""
    if config.reuse <= 1:
        return 0
    return -(-config.reuse // config.page_size) + 1


def extend_selection(pages: torch.Tensor, counts: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int) -> None:
    """In place: appends to every (sequence, KV head) row the pages past its last entry up to the
    sequence's current last page (torch ops, no host sync). Rows must have the room
    (pages.shape[2] >= count + new pages); the reuse staleness check bounds the growth."""
    width = pages.shape[2]
    cur_last = (seq_lens.to(torch.int64) + page_size - 1) // page_size - 1  # [S]
    cnt = counts.to(torch.int64)
    last = pages.to(torch.int64).gather(2, (cnt - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    last = torch.where(cnt > 0, last, torch.full_like(last, -1))  # [S, KVH]
    k = torch.arange(width, device=pages.device).view(1, 1, -1) - cnt.unsqueeze(-1)
    new = last.unsqueeze(-1) + 1 + k
    fill = (k >= 0) & (new <= cur_last.view(-1, 1, 1))
    pages.copy_(torch.where(fill, new, pages.to(torch.int64)).to(pages.dtype))
    grown = (cur_last.view(-1, 1) - last).clamp(min=0).clamp(max=width - cnt)
    counts.copy_((cnt + grown).to(counts.dtype))


def selection_recall(pages: torch.Tensor, counts: torch.Tensor, exact_pages: torch.Tensor,
                     exact_counts: torch.Tensor) -> tuple[int, int]:
    """(hits, total): how many of the exact selection's pages (summed over every (sequence, KV
    head) row) the selection `pages`/`counts` holds. Reads both back (profiling only)."""
    p, c = pages.cpu(), counts.cpu()
    ep, ec = exact_pages.cpu(), exact_counts.cpu()
    hits = total = 0
    for s in range(ec.shape[0]):
        for h in range(ec.shape[1]):
            want = set(ep[s, h, :int(ec[s, h])].tolist())
            have = set(p[s, h, :int(c[s, h])].tolist())
            hits += len(want & have)
            total += len(want)
    return hits, total


def _has_predicate() -> bool:
    import inspect
    try:
        return "when_zero" in (inspect.signature(_mempipe.score_and_select).parameters)
    except (TypeError, ValueError):  # pybind11 functions have no signature: read the doc
        return "when_zero" in (_mempipe.score_and_select.__doc__ or "")


_PREDICATE = None


def predicated(fn, *args, when_zero=None, when_nonzero=None, **kwargs):
    """fn(*args, **kwargs) that runs only when the int32 flag `when_zero` is 0 (or `when_nonzero`
    is not): the kernels' own predicate (no host sync on the GPU). A build without it evaluates
    a CPU flag on the host and refuses a CUDA one (it would need a host sync)."""
    global _PREDICATE
    if when_zero is None and when_nonzero is None:
        return fn(*args, **kwargs)
    if _PREDICATE is None:
        _PREDICATE = _has_predicate()
    if _PREDICATE:
        return fn(*args, when_zero=when_zero, when_nonzero=when_nonzero, **kwargs)
    flag = when_zero if when_zero is not None else when_nonzero
    if flag.is_cuda:
        raise RuntimeError("this mempipe build's kernels take no when_zero/when_nonzero "
                           "predicate; placement fpga on CUDA tensors needs it")
    nonzero = bool(int(flag.reshape(-1)[0]) != 0)
    if nonzero == (when_nonzero is not None):
        return fn(*args, **kwargs)
    return None


@dataclasses.dataclass
class LayerSelection:
    """A layer's selection kept across steps (reuse > 1)."""
    pages: torch.Tensor          # [S, KVH, budget pages + extra]
    counts: torch.Tensor         # [S, KVH]
    first_block: torch.Tensor    # [S] int32: block_table[:, 0] when made
    made_len: torch.Tensor       # [S] int32: seq_lens when made
    stale: torch.Tensor          # [1] int32: this step's rows do not match (device flag)
    key: tuple                   # (num_seqs, max_blocks, device): a change selects afresh
    made_step: int = -1          # the layer's step counter when it was made (-1: never)
    submit_step: int = -1        # async: the step whose query made the newest submission
    pending: list | None = None  # async: micro-batches submitted, not yet taken in
    next: tuple | None = None    # async: (pages, counts, first_block, made_len) submitted


class SchemeState:
    """The schemes' state for one (plan, configuration); see the module docstring."""

    def __init__(self, plan, config):
        self.plan = plan
        self.config = config
        self.steps: dict[int, int] = {}          # layer -> sparse decode calls so far
        self.selections: dict[int, LayerSelection] = {}
        self.ahead: dict[int, tuple] = {}        # target layer -> (kind, key, data)
        self.registry: dict[int, tuple] = {}     # layer -> (kv_cache, digests)
        self.status: dict[tuple, torch.Tensor] = {}
        self.ahead_buffers: dict[tuple, tuple] = {}
        self.profile_recall = False
        # Profiling hook (integration/bench/model_decode.py): marker(stage) is called before
        # ("relevancy" or "apply": the time since the last mark) and after ("retrieval": the
        # decode device waiting for the card) every card wait.
        self.marker = None
        self.recall: dict[str, list[int]] = {}   # kind -> [hits, total]
        self.recall_layers: dict[tuple, list[int]] = {}  # (kind, layer) -> [hits, total]
        # Host counts of what ran (no device reads): per path of a sparse layer's decode.
        self.counts = {"fresh": 0, "reused": 0, "cold": 0, "lookahead": 0,
                       "lookahead_submitted": 0, "card_requests": 0}
        self._stale_total: dict[torch.device, torch.Tensor] = {}

    # -- the card --------------------------------------------------------------------------
    def offload(self, device: torch.device):
        return self.plan.offload(self.config, device)

    def slot(self, layer: int, mb: int, purpose: str, device: torch.device) -> int:
        """The engine slot of (layer, micro-batch, purpose) under this configuration: fixed, and
        distinct across every configuration sharing the engine (a slot holds one request)."""
        return self.plan.offload_slot(self.config, device, (self.config, layer, mb, purpose))

    def status_flags(self, layer: int, n: int, device: torch.device) -> torch.Tensor:
        """[n] int32 per-micro-batch status of `layer` (0: the selection stands)."""
        key = (layer, n, device)
        t = self.status.get(key)
        if t is None:
            t = self.status[key] = torch.zeros(n, dtype=torch.int32, device=device)
        return t

    def stale_total(self, device: torch.device) -> torch.Tensor:
        t = self._stale_total.get(device)
        if t is None:
            t = self._stale_total[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return t

    def next_step(self, layer: int) -> int:
        n = self.steps.get(layer, 0)
        self.steps[layer] = n + 1
        return n

    def add_recall(self, kind: str, hits: int, total: int, layer: int | None = None) -> None:
        for acc in (self.recall.setdefault(kind, [0, 0]),
                    self.recall_layers.setdefault((kind, layer), [0, 0])):
            acc[0] += hits
            acc[1] += total

    def report(self) -> dict:
        """Host counts, stale reuse rows replaced (reads one device counter), recall (pooled
        over the profiled steps, layers and (sequence, KV head) rows; and per layer)."""
        out = dict(self.counts)
        out["stale_reuse"] = int(sum(int(t.item()) for t in self._stale_total.values()))
        out["recall"] = {k: (h / t if t else None) for k, (h, t) in self.recall.items()}
        by_layer: dict[str, dict] = {}
        for (kind, layer), (h, t) in sorted(self.recall_layers.items(),
                                            key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if layer is not None:
                by_layer.setdefault(kind, {})[layer] = {"hits": h, "total": t,
                                                        "recall": h / t if t else None}
        out["recall_by_layer"] = by_layer
        return out


def make_offload(config, device: torch.device, slots: int):
    """The `fpga` placement's engine for `device` ("cuda" or "cpu" mode)."""
    if not has_offload():
        raise ValueError("placement 'fpga' needs _mempipe.SelectionOffload, which this build "
                         "of mempipe lacks")
    name = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    return _mempipe.SelectionOffload(device=name,
                                     fpga_backend=config.fpga_backend, paced=config.fpga_paced,
                                     functional=config.fpga_functional,
                                     deadline_ms=float(config.deadline_ms), slots=slots,
                                     append_ring=int(config.fpga_append_ring))


def offload_key(config, device: torch.device) -> tuple:
    return (device.type, device.index, config.fpga_backend, config.fpga_paced,
            config.fpga_functional, float(config.deadline_ms), int(config.fpga_append_ring))


class SchemeDecode:
    """One layer's decode call under the configuration's schemes (PagedLayer.decode)."""

    def __init__(self, layer, query, kv_cache, block_table, seq_lens, out, digests,
                 lookahead_query=None):
        self.layer, self.c = layer, layer.config
        self.q_ahead = lookahead_query
        self.q, self.kv, self.bt, self.lens, self.out = query, kv_cache, block_table, seq_lens, out
        self.dev = query.device
        self.plan = layer._plan(self.dev)
        self.st = self.plan.schemes(self.c)
        self.num_seqs, self.max_blocks = block_table.shape
        self.fpga = self.c.placement == "fpga"
        self.mbs = micro_batches(self.num_seqs, self.c)
        self.budget_pages = self.c.budget // self.c.page_size
        self.key = (self.num_seqs, self.max_blocks, self.dev)
        self._digests = digests
        self.index = layer.layer_index

    # -- helpers -------------------------------------------------------------------------------
    def digests(self) -> torch.Tensor:
        return self._digests if self._digests is not None else self.layer.digests(self.kv)

    def views(self, width: int):
        return self.plan.views(self.num_seqs, self.layer.num_heads, self.layer.num_kv_heads,
                               self.max_blocks, width, self.dev)

    def rows(self, t: torch.Tensor, b: int, e: int) -> torch.Tensor:
        return t if (b, e) == (0, self.num_seqs) else t[b:e]

    def offload(self):
        return self.plan.offload(self.c, self.dev)

    def card_id(self) -> int:
        src = self.layer.digest_source or self.layer
        cid, new = self.plan.card_layer(self.c, src.layer_index, self.kv)
        if new:
            raise RuntimeError(f"mempipe: layer {src.layer_index}'s keys never reached the card "
                               "(placement fpga): append() them, or card_build() after writing "
                               "a prompt directly, before decoding")
        return cid

    def select_local(self, b, e, pages, counts, ws, when_nonzero=None, q=None, kv=None,
                     digests=None, fn=None):
        """The decode device's own selection of rows [b, e) (predicated on a flag)."""
        c = self.c
        predicated(fn or _mempipe.score_and_select, self.rows(self.q if q is None else q, b, e),
                   self.kv if kv is None else kv,
                   self.digests() if digests is None else digests,
                   self.rows(self.bt, b, e), self.rows(self.lens, b, e),
                   self.rows(pages, b, e), self.rows(counts, b, e), budget=c.budget,
                   sinks=c.sinks, locals=c.locals, aggregation=c.aggregation,
                   num_threads=self.layer.num_threads, workspace=ws, when_nonzero=when_nonzero)

    def submit(self, slot_purpose: str, target: int, card_id: int, q=None) -> None:
        c, off = self.c, self.offload()
        q = self.q if q is None else q
        for i, (b, e) in enumerate(self.mbs):
            off.submit(self.st.slot(target, i, slot_purpose, self.dev), card_id,
                       self.rows(q, b, e), self.rows(self.bt, b, e), self.rows(self.lens, b, e),
                       budget=c.budget,
                       sinks=c.sinks, locals=c.locals, aggregation=c.aggregation)
        self.st.counts["card_requests"] += len(self.mbs)

    def wait(self, slot_purpose: str, i: int, pages, counts, status) -> None:
        b, e = self.mbs[i]
        mark = self.st.marker
        if mark is not None:  # profiling: time up to here, then the wait alone
            mark("apply" if i else "relevancy")
        self.offload().wait(self.st.slot(self.index, i, slot_purpose, self.dev),
                            self.rows(pages, b, e), self.rows(counts, b, e), status[i:i + 1])
        if mark is not None:
            mark("retrieval")

    def settle(self, i, pages, counts, status, ws) -> bool:
        """After a card wait: fpga_fallback=gpu replaces a failed selection with the decode
        device's own (predicated on the status). Returns whether the decode must be predicated
        (fpga_fallback=dense)."""
        if self.c.fpga_fallback == "gpu":
            b, e = self.mbs[i]
            self.select_local(b, e, pages, counts, ws, when_nonzero=status[i:i + 1])
            return False
        return True

    def decode_rows(self, b, e, pages, counts, ws, flag=None) -> None:
        """Sparse decode of rows [b, e); with `flag`, dense where it is non-zero instead."""
        L = self.layer
        args = (self.rows(self.q, b, e), self.kv, self.rows(self.bt, b, e),
                self.rows(self.lens, b, e))
        o = self.rows(self.out, b, e)
        if flag is not None:
            predicated(_mempipe.dense_decode, *args, o, L.scale, num_threads=L.num_threads,
                       workspace=ws, when_nonzero=flag)
        predicated(_mempipe.sparse_decode, *args, self.rows(pages, b, e),
                   self.rows(counts, b, e), o, L.scale, num_threads=L.num_threads,
                   workspace=ws, when_zero=flag)

    def profile(self, kind, pages, counts, sel_ws) -> None:
        if not self.st.profile_recall:
            return
        width = self.budget_pages
        ep = torch.empty(self.num_seqs, self.layer.num_kv_heads, width, dtype=torch.int32,
                         device=self.dev)
        ec = torch.empty(self.num_seqs, self.layer.num_kv_heads, dtype=torch.int32,
                         device=self.dev)
        # The kernel itself, not a wrapper a harness may have put around it to count the
        # digest reads of the decode path (profiling is not part of it).
        fn = getattr(_mempipe.score_and_select, "__wrapped__", _mempipe.score_and_select)
        self.select_local(0, self.num_seqs, ep, ec, sel_ws, fn=fn)
        self.st.add_recall(kind, *selection_recall(pages, counts, ep, ec), layer=self.index)

    # -- the call ------------------------------------------------------------------------------
    def run(self) -> None:
        st, L = self.st, self.layer
        ahead = st.ahead.pop(self.index, None)
        if ahead is not None and ahead[1] != self.key:
            self.drop(ahead)
            ahead = None
        if self.c.lookahead:
            self.submit_lookahead()
        if not L.sparse:
            if ahead is not None:
                self.drop(ahead)
            L.calls["dense"] += 1
            _, _, _, dec_ws = self.views(self.budget_pages)
            _mempipe.dense_decode(self.q, self.kv, self.bt, self.lens, self.out, L.scale,
                                  num_threads=L.num_threads, workspace=dec_ws)
            return
        L.calls["sparse"] += 1
        st.registry[self.index] = (self.kv, self.digests(),
                                   self.card_id() if self.fpga else None)
        n = st.next_step(self.index)
        if self.c.reuse == 1:
            self.fresh(ahead)
        else:
            self.reuse(n)

    def drop(self, ahead, purpose: str = "ahead") -> None:
        """A card request that cannot be used (the batch changed): its slots are still waited
        for, into scratch, so they are free again."""
        if ahead[0] != "card":
            return
        mbs = ahead[2]
        kvh = self.layer.num_kv_heads
        rows = mbs[-1][1]
        pages = torch.empty(rows, kvh, self.budget_pages + extra_pages(self.c),
                            dtype=torch.int32, device=self.dev)
        counts = torch.empty(rows, kvh, dtype=torch.int32, device=self.dev)
        status = torch.empty(len(mbs), dtype=torch.int32, device=self.dev)
        for i, (b, e) in enumerate(mbs):
            self.offload().wait(self.st.slot(self.index, i, purpose, self.dev), pages[b:e],
                                counts[b:e], status[i:i + 1])

    def lookahead_query(self) -> torch.Tensor:
        """The query the next layer's digests are scored with: its own query speculated by
        the model code (lookahead_query=projected), or this layer's (same)."""
        if self.c.lookahead_query == "same":
            return self.q
        q = self.q_ahead
        if q is None:
            raise ValueError(
                f"mempipe: lookahead_query=projected, but layer {self.index}'s decode got no "
                f"speculated query for layer {self.index + 1} (PagedLayer.decode("
                "lookahead_query=...): the next layer's RMSNorm, W_q and RoPE applied to this "
                "layer's input hidden state). The transformers adapter computes it with "
                "MempipeCache(config, model=model); elsewhere set lookahead_query=same")
        if q.shape != self.q.shape or q.device != self.q.device or q.dtype != self.q.dtype:
            raise ValueError(
                f"mempipe: layer {self.index}'s speculated query for layer {self.index + 1} is "
                f"{tuple(q.shape)} {q.dtype} on {q.device}; the query is "
                f"{tuple(self.q.shape)} {self.q.dtype} on {self.q.device}")
        return q.contiguous()

    def submit_lookahead(self) -> None:
        """The next layer's selection, scored with lookahead_query() against its digests
        (that layer consumes it)."""
        st, c, target = self.st, self.c, self.index + 1
        if not c.layer_sparse(target) or target not in st.registry:
            return  # no next sparse layer, or it has not decoded yet (its digests unknown)
        q = self.lookahead_query()
        kv, digests, card_id = st.registry[target]
        stale = st.ahead.pop(target, None)
        if stale is not None:  # the target did not take the last one (it did not decode)
            saved, self.index = self.index, target
            self.drop(stale)
            self.index = saved
        if self.fpga:
            self.submit("ahead", target, card_id, q=q)
            st.ahead[target] = ("card", self.key, list(self.mbs))
        else:
            shape = (self.num_seqs, self.layer.num_kv_heads)
            pages = self.plan._buffer(f"ahead_pages{target % 2}",
                                      shape[0] * shape[1] * self.budget_pages, torch.int32,
                                      self.dev).view(*shape, self.budget_pages)
            counts = self.plan._buffer(f"ahead_counts{target % 2}", shape[0] * shape[1],
                                       torch.int32, self.dev).view(*shape)
            _, _, sel_ws, _ = self.views(self.budget_pages)
            self.select_local(0, self.num_seqs, pages, counts, sel_ws, q=q, kv=kv,
                              digests=digests)
            st.ahead[target] = ("local", self.key, (pages, counts))
        st.counts["lookahead_submitted"] += 1

    def fresh(self, ahead) -> None:
        """reuse=1: this step's selection (the card's, the local one, or the look-ahead)."""
        st = self.st
        pages, counts, sel_ws, dec_ws = self.views(self.budget_pages)
        status = st.status_flags(self.index, len(self.mbs), self.dev)
        kind = "fresh"
        if ahead is not None:
            st.counts["lookahead"] += 1
            kind = "lookahead"
            if ahead[0] == "local":
                pages, counts = ahead[2]
                for b, e in self.mbs:
                    self.decode_rows(b, e, pages, counts, dec_ws)
            else:
                for i, (b, e) in enumerate(self.mbs):
                    self.wait("ahead", i, pages, counts, status)
                    pred = self.settle(i, pages, counts, status, sel_ws)
                    self.decode_rows(b, e, pages, counts, dec_ws,
                                     status[i:i + 1] if pred else None)
        elif self.fpga:
            st.counts["fresh"] += 1
            self.submit("own", self.index, self.card_id())
            for i, (b, e) in enumerate(self.mbs):
                self.wait("own", i, pages, counts, status)
                pred = self.settle(i, pages, counts, status, sel_ws)
                self.decode_rows(b, e, pages, counts, dec_ws, status[i:i + 1] if pred else None)
        else:
            st.counts["fresh"] += 1
            for b, e in self.mbs:
                self.select_local(b, e, pages, counts, sel_ws)
                self.decode_rows(b, e, pages, counts, dec_ws)
        self.profile(kind, pages, counts, sel_ws)

    # -- reuse > 1 -----------------------------------------------------------------------------
    def selection(self) -> LayerSelection:
        st, width = self.st, self.budget_pages + extra_pages(self.c)
        sel = st.selections.get(self.index)
        if sel is not None and sel.key == self.key:
            return sel
        if sel is not None and sel.pending is not None and self.fpga:
            self.drop(("card", None, sel.pending), "own")
        kvh = self.layer.num_kv_heads
        z = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=self.dev)  # noqa: E731
        sel = LayerSelection(pages=z(self.num_seqs, kvh, width), counts=z(self.num_seqs, kvh),
                             first_block=z(self.num_seqs), made_len=z(self.num_seqs),
                             stale=z(1), key=self.key)
        sel.next = (z(self.num_seqs, kvh, width), z(self.num_seqs, kvh), z(self.num_seqs),
                    z(self.num_seqs))
        st.selections[self.index] = sel
        return sel

    def record(self, sel, status=None) -> None:
        """The selection in `sel` was made for this step's rows (failed card rows marked stale
        when the fallback is dense: their pages were not written)."""
        sel.first_block.copy_(self.bt[:, 0])
        if status is None or self.c.fpga_fallback == "gpu":
            sel.made_len.copy_(self.lens)
            return
        failed = torch.cat([status[i:i + 1].expand(e - b) for i, (b, e) in enumerate(self.mbs)])
        sel.made_len.copy_(torch.where(failed != 0, torch.full_like(self.lens, -(1 << 30)),
                                       self.lens))

    def select_into(self, sel, sel_ws, dec_ws, decode: bool) -> None:
        """A fresh selection of every row into `sel` (waited for), decoded when `decode`."""
        status = self.st.status_flags(self.index, len(self.mbs), self.dev)
        if self.fpga:
            self.submit("own", self.index, self.card_id())
            for i, (b, e) in enumerate(self.mbs):
                self.wait("own", i, sel.pages, sel.counts, status)
                pred = self.settle(i, sel.pages, sel.counts, status, sel_ws)
                if decode:
                    self.decode_rows(b, e, sel.pages, sel.counts, dec_ws,
                                     status[i:i + 1] if pred else None)
            self.record(sel, status)
        else:
            for b, e in self.mbs:
                self.select_local(b, e, sel.pages, sel.counts, sel_ws)
                if decode:
                    self.decode_rows(b, e, sel.pages, sel.counts, dec_ws)
            self.record(sel)

    def reuse(self, n: int) -> None:
        c, st = self.c, self.st
        width = self.budget_pages + extra_pages(c)
        _, _, sel_ws, dec_ws = self.views(width)
        sel = self.selection()
        if sel.made_step < 0:  # cold: nothing to reuse yet, select now and wait
            st.counts["cold"] += 1
            self.select_into(sel, sel_ws, dec_ws, decode=True)
            sel.made_step = sel.submit_step = n
            self.profile("fresh", sel.pages, sel.counts, sel_ws)
            return
        if not c.reuse_async:
            if n - sel.made_step >= c.reuse:
                st.counts["fresh"] += 1
                self.select_into(sel, sel_ws, dec_ws, decode=True)
                sel.made_step = n
                self.profile("fresh", sel.pages, sel.counts, sel_ws)
                return
            self.reused(sel, sel_ws, dec_ws, None)
            return
        pending_flag = None
        if sel.pending is not None:  # the selection submitted last step: take it in
            pending_flag = self.take_pending(sel, sel_ws)
        if n - sel.submit_step >= c.reuse:  # submit the next one before decoding (overlap)
            self.submit_next(sel, sel_ws)
            sel.submit_step = n
        self.reused(sel, sel_ws, dec_ws, pending_flag)

    def submit_next(self, sel, sel_ws) -> None:
        """Async reuse: a selection from this step's query, taken in at the next step."""
        pages, counts, first, made = sel.next
        first.copy_(self.bt[:, 0])
        made.copy_(self.lens)
        if self.fpga:
            self.submit("own", self.index, self.card_id())
        else:
            for b, e in self.mbs:
                self.select_local(b, e, pages, counts, sel_ws)
        sel.pending = list(self.mbs)

    def take_pending(self, sel, sel_ws):
        pages, counts, first, made = sel.next
        mbs, sel.pending = sel.pending, None
        if not self.fpga:
            sel.pages.copy_(pages)
            sel.counts.copy_(counts)
            sel.first_block.copy_(first)
            sel.made_len.copy_(made)
            return None
        status = self.st.status_flags(self.index, len(mbs), self.dev)
        saved, self.mbs = self.mbs, mbs
        for i in range(len(mbs)):
            self.wait("own", i, sel.pages, sel.counts, status)
        self.mbs = saved
        ok = (status.amax() == 0).view(1)
        sel.first_block.copy_(torch.where(ok, first, sel.first_block))
        sel.made_len.copy_(torch.where(ok, made, sel.made_len))
        # A failed card selection: the rows keep the older selection (the card left them
        # untouched), so it is reused a step longer; its status forces the fallback below.
        return status.amax().view(1).to(torch.int32)

    def reused(self, sel, sel_ws, dec_ws, pending_flag) -> None:
        """A step that reuses `sel`: extended to the newest page, checked against this step's
        rows (a row whose first block changed, or that grew by more than `reuse` tokens since,
        is stale: the whole batch falls back), then decoded."""
        c, st = self.c, self.st
        st.counts["reused"] += 1
        extend_selection(sel.pages, sel.counts, self.lens, c.page_size)
        grown = self.lens - sel.made_len
        bad = (self.bt[:, 0] != sel.first_block) | (grown < 0) | (grown > c.reuse)
        sel.stale.copy_(bad.any().to(torch.int32).view(1))
        st.stale_total(self.dev).add_(sel.stale)
        flag = sel.stale if pending_flag is None else torch.maximum(sel.stale, pending_flag)
        if not self.fpga or c.fpga_fallback == "gpu":
            # The decode device's own selection replaces a stale (or failed) one.
            self.select_local(0, self.num_seqs, sel.pages, sel.counts, sel_ws, when_nonzero=flag)
            keep = flag == 0
            sel.first_block.copy_(torch.where(keep, sel.first_block, self.bt[:, 0]))
            sel.made_len.copy_(torch.where(keep, sel.made_len, self.lens))
            self.decode_rows(0, self.num_seqs, sel.pages, sel.counts, dec_ws)
        else:
            self.decode_rows(0, self.num_seqs, sel.pages, sel.counts, dec_ws, flag)
        self.profile("reuse", sel.pages, sel.counts, sel_ws)
