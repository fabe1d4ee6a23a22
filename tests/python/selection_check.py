"""Checks of sparse decoding inside an end-to-end run (issue 14): a planted relevant page, the
float64 reference selection and the float64 reference output, applied to every sparse decode
step of a real generation loop (vLLM's engine or transformers' generate).

`SelectionCheck.install(setattr_fn)` wraps the module's `score_and_select`, `sparse_decode` and
`score_select_decode` (mempipe._mempipe, which PagedLayer, the torch.ops operators and so the
vLLM and transformers adapters all call; PagedLayer's plain path runs a host layer as the one
call `score_select_decode`). At every selection it:

1. plants a relevant page: in each sequence long enough for the budget to force a choice, the
   middle page's keys (and digests) become a multiple of the KV head's summed query direction,
   scaled so that its Quest score clearly exceeds every other page's (by half the best other
   score, plus one). The page is then the one a correct selection must choose;
2. checks the digests against the keys (exact max/min), computes the float64-reference
   selection (reference.ref_scores / ref_select, from reference digests) and compares the
   selection the decode will use with it, and whether the planted page is in it;
3. after `sparse_decode`, compares the output with the float64 attention restricted to the
   REFERENCE selection, within a tolerance derived from fp32 rounding (below).

In mode "mempipe" the one call runs as itself (checks before and after it); the wrong modes
must replace the selection between the two steps, so there it runs as score_and_select, then
sparse_decode (bit-identical: tests/backend/host_sparse_layer_test.cc).

`mode` replaces mempipe's selection to prove the checks bite:
  "mempipe"   mempipe's own selection (all checks must pass);
  "position"  a position-only selection of the same size (the first pages and the newest ones,
              StreamingLLM style);
  "drop"      mempipe's own selection with the planted page removed.
Both wrong modes must fail the selection, planted-page and output checks.

Tolerance for one output element (cache dtype fp32; u = 2^-24, first-order worst case):
  logits   D * u * M per logit, M = max_t sum_d |q_d k_td| * scale; a softmax weight's relative
           error is at most twice that;
  sum      (L + 8) * u for the normalization and the weighted sum of L terms (and exp);
so |out - ref| <= 2 * (2 * D * M + L + 8) * u * max|v| (+ u_out * |ref| when the output is
rounded to a narrower dtype), with a factor 2 of margin. Dropping the planted page, which
carries most of the softmax mass of the heads it serves, moves the output by a sizeable
fraction of max|v|, orders of magnitude beyond it.
"""

from __future__ import annotations

import functools

import torch

from mempipe.attention import keys_transposed, logical_keys
from reference import PagedBatch, ref_decode, ref_scores, ref_select

MODES = ("mempipe", "position", "drop")
U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


class SelectionCheck:
    def __init__(self, mode: str = "mempipe"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.stats = {"selections": 0, "heads_checked": 0, "selection_wrong": 0,
                      "planted": 0, "planted_chosen": 0, "digests_wrong": 0,
                      "outputs_checked": 0, "output_wrong": 0, "max_err_over_tol": 0.0}
        self._pending: dict[int, tuple] = {}
        # Per CPU selection, in call order: the sequences that got a planted page. A step
        # whose queries sum to zero plants nothing (see _plant), so a caller that counts
        # pages per step must look here rather than assume every step was planted.
        self.planted_steps: list[frozenset[int]] = []
        self._select = None
        self._decode = None
        self._fused = None

    def install(self, setattr_fn=setattr) -> "SelectionCheck":
        """Wraps the module's functions; pass pytest's monkeypatch.setattr to undo afterwards."""
        from mempipe import _mempipe
        self._select, self._decode = _mempipe.score_and_select, _mempipe.sparse_decode
        self._fused = _mempipe.score_select_decode

        def score_and_select(*args, **kw):
            return self._score_and_select(*args, **kw)

        def sparse_decode(*args, **kw):
            return self._sparse_decode(*args, **kw)

        def score_select_decode(*args, **kw):
            return self._score_select_decode(*args, **kw)

        # Same name, doc and __wrapped__ as the module's functions: code that inspects them (the
        # schemes' predicate probe) sees the originals.
        functools.update_wrapper(score_and_select, self._select)
        functools.update_wrapper(sparse_decode, self._decode)
        functools.update_wrapper(score_select_decode, self._fused)
        setattr_fn(_mempipe, "score_and_select", score_and_select)
        setattr_fn(_mempipe, "sparse_decode", sparse_decode)
        setattr_fn(_mempipe, "score_select_decode", score_select_decode)
        return self

    def reset(self, mode: str) -> None:
        """Switches to `mode` and zeroes the statistics (the wrappers stay installed)."""
        fresh = SelectionCheck(mode)
        self.mode, self.stats, self._pending = fresh.mode, fresh.stats, fresh._pending
        self.planted_steps = fresh.planted_steps

    def summary(self) -> dict:
        return dict(self.stats, mode=self.mode)

    # --- wrappers ---------------------------------------------------------------------------

    def _score_and_select(self, query, kv_cache, digests, block_table, seq_lens, pages, counts,
                          **kw):
        if kv_cache.is_cuda:  # the end-to-end tests run on the CPU; pass anything else through
            return self._select(query, kv_cache, digests, block_table, seq_lens, pages, counts,
                                **kw)
        ctx = self._before_selection(query, kv_cache, digests, block_table, seq_lens, kw)
        self._select(query, kv_cache, digests, block_table, seq_lens, pages, counts, **kw)
        self._after_selection(ctx, query, kv_cache, seq_lens, pages, counts)

    def _sparse_decode(self, query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
                       **kw):
        self._decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale, **kw)
        if not kv_cache.is_cuda:
            self._check_output(query, kv_cache, out, scale)

    def _score_select_decode(self, query, kv_cache, digests, block_table, seq_lens, pages,
                             counts, out, scale, **kw):
        if kv_cache.is_cuda:
            return self._fused(query, kv_cache, digests, block_table, seq_lens, pages, counts,
                               out, scale, **kw)
        if self.mode != "mempipe":  # the wrong selection goes in between the two steps
            threads = kw.pop("num_threads", 1)
            self._score_and_select(query, kv_cache, digests, block_table, seq_lens, pages,
                                   counts, num_threads=threads, **kw)
            self._sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
                                num_threads=threads)
            return
        ctx = self._before_selection(query, kv_cache, digests, block_table, seq_lens, kw)
        self._fused(query, kv_cache, digests, block_table, seq_lens, pages, counts, out, scale,
                    **kw)
        self._after_selection(ctx, query, kv_cache, seq_lens, pages, counts)
        self._check_output(query, kv_cache, out, scale)

    # --- the checks around a selection and a decode -------------------------------------------

    def _before_selection(self, query, kv_cache, digests, block_table, seq_lens, kw):
        """Plants the pages and computes the reference selection; returns what the checks after
        the selection need."""
        budget, sinks = kw["budget"], kw.get("sinks", 1)
        locals_, aggregation = kw.get("locals", 1), kw.get("aggregation", "max")
        bs = kv_cache.shape[2]
        k = budget // bs
        planted = self._plant(query, kv_cache, digests, block_table, seq_lens, k, sinks, locals_,
                              aggregation)
        batch = _gather(kv_cache, block_table, seq_lens)
        ref_dg = digests.clone()
        self.stats["digests_wrong"] += _check_digests(batch, digests, ref_dg)
        want = ref_select(ref_scores(query, batch, ref_dg, aggregation), seq_lens.tolist(), bs,
                          budget, sinks, locals_)
        return batch, want, planted, bs, k, sinks

    def _after_selection(self, ctx, query, kv_cache, seq_lens, pages, counts) -> None:
        batch, want, planted, bs, k, sinks = ctx
        self._replace(pages, counts, seq_lens, bs, k, sinks, planted)
        st = self.stats
        st["selections"] += 1
        self.planted_steps.append(frozenset(planted))
        for s in range(query.shape[0]):
            for g in range(kv_cache.shape[3]):
                got = pages[s, g, :int(counts[s, g])].tolist()
                st["heads_checked"] += 1
                st["selection_wrong"] += got != want[s][g]
                if s in planted:
                    st["planted"] += 1
                    st["planted_chosen"] += planted[s] in got
        self._pending[kv_cache.data_ptr()] = (batch, want, query.clone())

    def _check_output(self, query, kv_cache, out, scale) -> None:
        pending = self._pending.pop(kv_cache.data_ptr(), None)
        if pending is None:
            return
        batch, want, q_sel = pending
        assert torch.equal(q_sel, query), "sparse_decode got another query than the selection"
        ref = ref_decode(query, batch, scale, pages=want)
        tol = _tolerance(query, batch, want, scale, ref, out.dtype)
        err = (out.double() - ref).abs()
        st = self.stats
        st["outputs_checked"] += err.numel()
        st["output_wrong"] += int((err > tol).sum())
        st["max_err_over_tol"] = max(st["max_err_over_tol"], float((err / tol).max()))

    # --- planting and the wrong selections ----------------------------------------------------

    def _plant(self, query, kv_cache, digests, block_table, seq_lens, k, sinks, locals_,
               aggregation) -> dict[int, int]:
        """Plants a page per sequence with a real choice; returns {sequence: planted page}."""
        bs, kvh = kv_cache.shape[2], kv_cache.shape[3]
        group = query.shape[1] // kvh
        planted = {}
        for s, n_tok in enumerate(seq_lens.tolist()):
            n = -(-n_tok // bs)
            middle = n - sinks - locals_
            if n <= k or middle < 2:
                continue
            page = sinks + middle // 2  # a full page: locals >= 1 keep the newest one out
            block = int(block_table[s, page])
            ids = block_table[s, :n].long()
            sums = query[s].double().reshape(kvh, group, -1).sum(1)  # [kvh, D]
            if not bool((sums.norm(dim=-1) > 0).all()):
                # A group whose queries sum to zero (e.g. the zero embedding of a padding token
                # generated by a random model, through RMSNorm and a bias-free W_q) scores every
                # page alike: no key can make one page win, so nothing is planted.
                continue
            for g in range(kvh):
                q = query[s, g * group:(g + 1) * group].double()
                d = sums[g] / sums[g].norm()
                unit = (q @ d).max() if aggregation == "max" else (q @ d).sum()
                mx, mn = digests[ids, 0, g].double(), digests[ids, 1, g].double()
                others = torch.maximum(q[:, None, :] * mx, q[:, None, :] * mn).sum(-1)
                others = others.amax(0) if aggregation == "max" else others.sum(0)
                others[page] = float("-inf")
                best = float(others.max())
                alpha = (1.5 * abs(best) + 1.0) / float(unit)
                key = (alpha * d).to(kv_cache.dtype)
                _set_page_keys(kv_cache, block, g, key)
                digests[block, 0, g] = key.to(digests.dtype)
                digests[block, 1, g] = key.to(digests.dtype)
            planted[s] = page
        return planted

    def _replace(self, pages, counts, seq_lens, bs, k, sinks, planted) -> None:
        if self.mode == "mempipe":
            return
        for s, n_tok in enumerate(seq_lens.tolist()):
            n = -(-n_tok // bs)
            for g in range(pages.shape[1]):
                chosen = pages[s, g, :int(counts[s, g])].tolist()
                if self.mode == "position" and n > k:
                    first = max(sinks, k // 2)
                    keep = sorted(set(range(first)) | set(range(n - (k - first), n)))
                elif self.mode == "drop" and s in planted:
                    keep = [p for p in chosen if p != planted[s]]
                else:
                    continue
                pages[s, g, :len(keep)] = torch.tensor(keep, dtype=pages.dtype)
                counts[s, g] = len(keep)


def _set_page_keys(kv_cache, block: int, g: int, key) -> None:
    """Every token's key of KV head g in `block` set to `key`, in any layout: a head_kt / page_kt
    cache's K pages are transposed, so there the page's keys are read back (logical_keys),
    changed and written through the module's writer, V rewritten as it was."""
    if not keys_transposed(kv_cache):
        kv_cache[0, block, :, g, :] = key
        return
    import mempipe.ops
    bs = kv_cache.shape[2]
    keys = logical_keys(kv_cache, torch.tensor([block]))[0]  # [bs, kvh, D], a copy
    keys[:, g, :] = key
    slots = block * bs + torch.arange(bs)
    mempipe.ops.write_kv(kv_cache, slots, keys, kv_cache[1, block].clone())


def _gather(kv_cache, block_table, seq_lens) -> PagedBatch:
    """The batch's keys and values per sequence, [len, kv_heads, head_dim], from its pages (the
    keys of a head_kt / page_kt cache read back through logical_keys)."""
    bs, kvh, d = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    keys, values = [], []
    for s, n in enumerate(seq_lens.tolist()):
        ids = block_table[s, :-(-n // bs)].long()
        keys.append(logical_keys(kv_cache, ids).reshape(-1, kvh, d)[:n].clone())
        values.append(kv_cache[1, ids].reshape(-1, kvh, d)[:n].clone())
    return PagedBatch(kv_cache, block_table, seq_lens, keys, values, bs)


def _check_digests(batch: PagedBatch, digests, ref_dg) -> int:
    """Writes the exact max/min of each used page into `ref_dg`; returns how many (page, KV
    head) digests of `digests` differ from them."""
    wrong = 0
    bs = batch.block_size
    for s, n in enumerate(batch.seq_lens.tolist()):
        for p in range(-(-n // bs)):
            keys = batch.keys[s][p * bs:min(n, (p + 1) * bs)]
            b = int(batch.block_table[s, p])
            want = torch.stack([keys.amax(0), keys.amin(0)]).to(ref_dg.dtype)  # [2, kvh, D]
            wrong += int((digests[b] != want).any(-1).any(0).sum())
            ref_dg[b] = want
    return wrong


def _tolerance(query, batch, pages, scale, ref, out_dtype) -> torch.Tensor:
    """[S, H] derived bound per output row (module docstring)."""
    kvh = batch.kv_cache.shape[3]
    group = query.shape[1] // kvh
    d = query.shape[2]
    bs = batch.block_size
    tol = torch.empty(query.shape[:2], dtype=torch.float64)
    for s, n in enumerate(batch.seq_lens.tolist()):
        for h in range(query.shape[1]):
            g = h // group
            idx = torch.cat([torch.arange(p * bs, min(n, (p + 1) * bs)) for p in pages[s][g]])
            k = batch.keys[s][idx, g].double()
            v = batch.values[s][idx, g].double()
            m = float((k.abs() @ query[s, h].double().abs()).max()) * scale
            vmax = float(v.abs().max())
            tol[s, h] = 2 * (2 * d * m + len(idx) + 8) * U32 * vmax
    u_out = UNIT_ROUNDOFF[out_dtype] if out_dtype != torch.float32 else 0.0
    return tol[..., None] + u_out * ref.abs() + 1e-30


def assert_all_correct(summary: dict) -> None:
    """Every check passed, and each had something to check."""
    assert summary["selections"] > 0 and summary["outputs_checked"] > 0, summary
    assert summary["planted"] > 0, f"no sequence was long enough to plant a page: {summary}"
    assert summary["digests_wrong"] == 0, summary
    assert summary["selection_wrong"] == 0, f"selection differs from the reference: {summary}"
    assert summary["planted_chosen"] == summary["planted"], f"planted page missed: {summary}"
    assert summary["output_wrong"] == 0, f"output differs from the reference: {summary}"


def assert_all_caught(summary: dict) -> None:
    """A wrong selection fails the selection, planted-page and output checks."""
    assert summary["planted"] > 0, summary
    assert summary["selection_wrong"] > 0, f"the selection check missed it: {summary}"
    assert summary["planted_chosen"] < summary["planted"], f"planted check missed it: {summary}"
    assert summary["output_wrong"] > 0, f"the output check missed it: {summary}"
