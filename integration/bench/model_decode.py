#!/usr/bin/env python3
"""Whole-model decode throughput on one GPU: a random-weight model, linear layers through torch
(cuBLAS), attention per placement, timed under CUDA graphs (issue 12).

Placements (every one over the same KV memory, so they compare on identical data):
  dense-sdpa   torch SDPA (flash / cuDNN / efficient: the fastest one is picked per
               configuration) over each sequence's contiguous cache; the new token's K/V are
               written by a torch slice assignment
  dense-paged  mempipe's dense paged decode (append + digest kernel, dense decode kernel)
  gpu          mempipe sparse: fused append + digest, fused score + top-k select, sparse decode
               (first --dense_layers layers dense, as Quest keeps them)
  fpga         steps 1-3 on the selection-offload engine (the emulated U55C, paced to its
               modeled time; its functional result from the CPU reference), step 4 on the GPU
               stream that waits for the card's selection (no host sync); one row per scheme in
               --fpga_schemes: sync, pipelined4 (4 micro-batches), reuse4 (async reuse, C=4),
               lookahead (layer L+1's digests scored while layer L runs, with layer L+1's query
               speculated from layer L's input: its RMSNorm, W_q rows and RoPE, one extra GEMV
               per layer, timed as its own share of `linear`; `lookahead_same`, not run by
               default: layer L's own query, the first version). Each row adds the share
               of the card's time hidden behind GPU work (1 - GPU wait / modeled card time; the
               wait measured by the engine's wait kernel over the timed window on CUDA, from
               the profiled step on the CPU), fallbacks by reason, host-bound requests, bytes over
               PCIe (real GPU<->host staging copies; modeled host<->card), modeled FPGA energy
               per token, and selection recall of reuse / look-ahead against the exact selection
               of the same step and layer (measured over --recall_steps eager steps with fresh
               random input tokens: random weights, so a pessimistic figure, not a quality one)

The prompt is not prefilled by the model: every layer's cache is filled once with random keys
and values (seeded) and its page digests (max, min per page) are built from them with torch;
then the decode step (embedding, per layer RMSNorm -> QKV -> RoPE -> attention -> O -> RMSNorm
-> gate/up -> SiLU -> down, final norm, LM head) is captured in one CUDA graph per placement and
replayed. The context is held constant while timing (each replay writes the new token at the same
position L-1 and attends to L tokens), so every timed step does the same work.

Per configuration (context x batch x placement) it reports: the median step time of the graph
replays, tokens/s, the step split by stage from one profiled eager (non-graph) step with CUDA
events around every operation (scaled to the graph's step time; raw figures kept), memory
processing's share, bytes moved vs the byte floor, speedup over the faster dense placement,
GPU energy per token from NVML's total-energy counter over the timed window, and the relative
L2 error against dense-sdpa on the same input token and cache of the last step's last-layer
attention output (`rel_err`; its input already carries the earlier layers' differences) and of
its logits (`rel_err_logits`).

  python3 integration/bench/model_decode.py --json out.json [--md out.md]
        [--model llama3-8b|llama3-70b-slice] [--contexts 32768,131072,524288]
        [--batches 1,8,max] [--placements dense-sdpa,dense-paged,gpu,fpga]
        [--fpga_schemes sync,pipelined4,reuse4,lookahead] [--deadline_ms 100]
        [--budget 4096 --page 16 --dense_layers 2] [--min_window_s 0.5] [--seed 1]
  python3 integration/bench/model_decode.py --device cpu --json smoke.json   # tiny CPU smoke

Flags:
  --device        cuda (default) or cpu. cpu: tiny model shape (--model tiny), fp32, contexts
                  256,512, batches 1,2, one torch thread, no CUDA graphs, no NVML; the sparse
                  placement is mempipe's `cpu` one; for tests.
  --model         llama3-8b (32 layers, 4096 hidden, 32/8 heads, head_dim 128, FFN 14336,
                  vocab 128256), llama3-70b-slice (20 of Llama-3-70B's 80 layers at full width:
                  one stage of a 4-stage pipeline-parallel split; 8192 hidden, 64/8 heads, FFN
                  28672), tiny (2 layers, 256 hidden, 4/2 heads, head_dim 64; the CPU default)
  --contexts      tokens per sequence (comma list; multiples of --page)
  --batches       comma list; `max` = the largest batch whose weights + KV + digests fit in
                  the device's free memory (with --headroom_gib spare)
  --placements    which placements to run (comma list; default dense-sdpa,dense-paged,gpu);
                  without `fpga`, a labelled fpga gap row is added per configuration
                  (integration/bench/run_model_decode_fpga.sh runs the fpga rows); without a
                  dense one, speedup_over_dense and rel_err are null (a note at the start and
                  on every row says so)
  --fpga_schemes  the fpga rows (comma list of sync, pipelined4, reuse4, lookahead,
                  lookahead_same; default sync,pipelined4,reuse4,lookahead)
  --deadline_ms   the card's deadline per selection (default 100, the configuration default)
  --fpga_fallback gpu (the GPU's own selection over its digest copy) or dense
  --recall_steps  eager steps of the recall measurement (default 5: covers a reuse=4 cycle)
  --budget, --page, --dense_layers, --sinks, --locals   the sparse configuration (defaults
                  4096, 16, 2, 1, 1; on cpu budget 64 and 1 dense layer)
  --steps         timed graph replays (default 10, cpu 3; at least: grown until --min_window_s of timed window so
                  the NVML energy counter resolves it)
  --min_window_s  shortest timed window in seconds
  --hbm_tbs       the byte floor's bandwidth in TB/s (default: 4.8, H200 datasheet peak); the
                  run also measures device-to-device copy bandwidth and reports that floor too
  --headroom_gib  memory left free when sizing `max` batches
  --json, --md    outputs: `mempipe.throughput/1` JSON (DESIGN_SPACE.md) and a Markdown table
  --seed          random weights, cache contents and tokens
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SCHEMA = "mempipe.throughput/1"
STAGES = ("append", "prepare", "relevancy", "retrieval", "apply", "linear")
PLACEMENTS = ("dense-sdpa", "dense-paged", "gpu")  # the default rows (model_decode_tp's too)
# The fpga rows: scheme name -> MempipeConfig keys (placement=fpga).
FPGA_SCHEMES = {
    "sync": {},
    "pipelined4": {"mode": "pipelined", "micro_batches": 4},
    "reuse4": {"reuse": 4, "reuse_async": True},
    "lookahead": {"lookahead": True, "lookahead_query": "projected"},
    "lookahead_same": {"lookahead": True, "lookahead_query": "same"},
}
DEFAULT_FPGA_SCHEMES = ("sync", "pipelined4", "reuse4", "lookahead")
# A row's note where --placements ran no dense placement to compare with (speedup and rel_err
# are then null, and the table shows a dash).
NO_DENSE_NOTE = "no dense placement ran: speedup_over_dense and rel_err are empty"


def no_dense_message(placements) -> str | None:
    """The warning printed at the start when --placements has no dense placement, else None."""
    if any(p.startswith("dense") for p in placements):
        return None
    return ("--placements has no dense placement (dense-sdpa, dense-paged): speedup_over_dense "
            "and rel_err are left empty (null; '—' in the table); add one to get them")


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = 500000.0


MODELS = {
    "llama3-8b": Shape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama3-70b-slice": Shape("Llama-3-70B slice (20 of 80 layers)", 20, 8192, 64, 8, 128,
                              28672, 128256),
    "tiny": Shape("tiny", 2, 256, 4, 2, 64, 512, 1000),
}


def weight_params(s: Shape) -> int:
    """Parameters read per decode step (all layers, final norm, LM head; one embedding row
    is negligible and not counted)."""
    per_layer = (s.hidden * (s.q_heads + 2 * s.kv_heads) * s.head_dim  # qkv
                 + s.q_heads * s.head_dim * s.hidden  # o
                 + 2 * s.hidden * s.ffn + s.ffn * s.hidden  # gate, up, down
                 + 2 * s.hidden)  # norms
    return s.layers * per_layer + s.hidden + s.hidden * s.vocab


def kv_bytes_per_token(s: Shape, elem: int) -> int:
    return s.layers * 2 * s.kv_heads * s.head_dim * elem


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
class Model:
    """Random-weight decoder (Llama layout), one decode token per sequence."""

    def __init__(self, s: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
        self.s, self.dtype, self.device = s, dtype, device

        def w(rows, cols):
            t = torch.empty(rows, cols, dtype=dtype, device=device)
            t.normal_(0.0, 1.0 / math.sqrt(cols), generator=gen)
            return t

        self.embed = w(s.vocab, s.hidden) * math.sqrt(s.hidden) / 8
        self.layers = []
        qkv = (s.q_heads + 2 * s.kv_heads) * s.head_dim
        for _ in range(s.layers):
            self.layers.append({
                "n1": torch.ones(s.hidden, dtype=dtype, device=device),
                "qkv": w(qkv, s.hidden), "o": w(s.hidden, s.q_heads * s.head_dim),
                "n2": torch.ones(s.hidden, dtype=dtype, device=device),
                "gate_up": w(2 * s.ffn, s.hidden), "down": w(s.hidden, s.ffn)})
        self.norm = torch.ones(s.hidden, dtype=dtype, device=device)
        self.lm_head = w(s.vocab, s.hidden)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float64)
                                      / s.head_dim))
        self.inv_freq = inv.float().to(device)

    def rope(self, position: int):
        """(cos, signed sin) over head_dim for `position`, rotate-half convention."""
        ang = position * self.inv_freq
        cos, sin = torch.cos(ang), torch.sin(ang)
        return (torch.cat([cos, cos]).to(self.dtype), torch.cat([-sin, sin]).to(self.dtype))


def rms_norm(x, w, eps=1e-5):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def apply_rope(x, cos, sin_signed):
    """x [..., D] rotated (rotate-half convention): x * cos + [x2, x1] * [-sin, sin]."""
    h = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., h:], x[..., :h]], dim=-1), sin_signed)


class Timer:
    """Wall time by stage: CUDA events between operations (or perf_counter on the CPU)."""

    STAGES = STAGES  # the stages totals() always reports (a subclass may add its own)

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def start(self):
        if self.enabled:
            self.marks = [("", self._now())]

    def mark(self, stage: str):
        if self.enabled:
            self.marks.append((stage, self._now()))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {k: 0.0 for k in self.STAGES}
        for (_, a), (stage, b) in zip(self.marks, self.marks[1:]):
            # `speculate` (look-ahead's speculated query) is reported apart by measure().
            out[stage] = out.get(stage, 0.0) + (a.elapsed_time(b) if self.cuda
                                                else (b - a) * 1e3)
        return out


class Runner:
    """One (context, batch): caches, static inputs, and one decode step per placement."""

    def __init__(self, model: Model, context: int, batch: int, args, gen: torch.Generator):
        import mempipe
        from mempipe.attention import DecodePlan, PagedLayer
        s = model.s
        self.model, self.L, self.B, self.args = model, context, batch, args
        dev = model.device
        page = args.page
        self.blocks = context // page
        nb = batch * self.blocks
        # One paged cache per layer; block table = identity, so sequence b's K (or V) is the
        # contiguous slice [b*blocks*page, (b+1)*blocks*page) -- the "contiguous cache" of the
        # dense-sdpa placement is a view of the same memory.
        self.caches, self.digests = self.fill_caches(nb, gen)
        self.block_table = torch.arange(nb, dtype=torch.int32, device=dev).view(batch, -1)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
        self.slots = (torch.arange(batch, device=dev, dtype=torch.int64) * context
                      + (context - 1))
        self.tokens = torch.randint(0, s.vocab, (batch,), generator=gen, device=dev)
        self.cos, self.sin = model.rope(context - 1)
        self.logits = torch.empty(batch, s.vocab, dtype=torch.float32, device=dev)
        self.attn_out = torch.empty(batch, s.q_heads, s.head_dim, dtype=model.dtype, device=dev)
        self.plan = DecodePlan()
        sparse = "gpu" if dev.type == "cuda" else "cpu"
        self.sparse_placement = sparse
        cfgs = {
            "dense-paged": mempipe.MempipeConfig(placement="dense", budget=args.budget,
                                                 page_size=page, dense_layers=args.dense_layers),
            "gpu": mempipe.MempipeConfig(placement=sparse, budget=args.budget, page_size=page,
                                         dense_layers=args.dense_layers, sinks=args.sinks,
                                         locals=args.locals),
        }
        for name in getattr(args, "fpga_list", []):
            cfgs["fpga-" + name] = mempipe.MempipeConfig(
                placement="fpga", budget=args.budget, page_size=page,
                dense_layers=args.dense_layers, sinks=args.sinks, locals=args.locals,
                deadline_ms=args.deadline_ms, fpga_fallback=args.fpga_fallback,
                **FPGA_SCHEMES[name])
        self.cfgs = cfgs
        # One engine serves every fpga row; each row holds a slot per (layer, micro-batch) and
        # its look-ahead keys, more than the plan's default when several schemes run side by side.
        fpga_rows = [c for p, c in cfgs.items() if p.startswith("fpga-")]
        self.plan.offload_slots = max(self.plan.offload_slots, sum(
            2 * (max(1, c.micro_batches) + 1) * s.layers for c in fpga_rows))
        # Placements whose look-ahead scores layer L+1 with its speculated query.
        self.speculate = {p for p, c in cfgs.items()
                          if c.lookahead and c.lookahead_query == "projected"}
        scale = s.head_dim ** -0.5
        self.paged = {p: [PagedLayer(c, i, s.q_heads, s.kv_heads, s.head_dim, scale,
                                     plan=self.plan) for i in range(s.layers)]
                      for p, c in cfgs.items()}
        # The card's digests of every sparse layer, built once per engine (the fpga rows with
        # the same card settings share one engine, as one model would).
        for p, layers in self.paged.items():
            if not p.startswith("fpga-"):
                continue
            for i, layer in enumerate(layers):
                if not layer.sparse:
                    continue
                card_id, new = self.plan.card_layer(layer.config, i, self.caches[i])
                if new:
                    self.plan.offload(layer.config, dev).build_digests(
                        card_id, self.caches[i], self.block_table, self.seq_lens)
        self.plan.reserve(batch, s.q_heads, s.kv_heads, self.blocks, args.budget // page, dev)
        self.sdpa_backend = None
        self.sdpa_form = "rows"

    def fill_caches(self, nb: int, gen: torch.Generator):
        """Every layer's paged cache [2, nb, page, kv_heads, D] filled with random keys and
        values, and its page digests [nb, 2, kv_heads, D] (max, min) built from them."""
        s, dev, page = self.model.s, self.model.device, self.args.page
        caches, digests = [], []
        chunk = max(1, (1 << 28) // (page * s.kv_heads * s.head_dim))  # pages per fill chunk
        for _ in range(s.layers):
            kv = torch.empty(2, nb, page, s.kv_heads, s.head_dim, dtype=self.model.dtype,
                             device=dev)
            dg = torch.empty(nb, 2, s.kv_heads, s.head_dim, dtype=self.model.dtype, device=dev)
            for a in range(0, nb, chunk):
                b = min(nb, a + chunk)
                kv[:, a:b].normal_(generator=gen)
                keys = kv[0, a:b]
                dg[a:b, 0] = keys.amax(1)
                dg[a:b, 1] = keys.amin(1)
            caches.append(kv)
            digests.append(dg)
        return caches, digests

    # Tensor-parallel hooks (model_decode_tp.py overrides them; one GPU: identities).
    def reduce(self, partial: torch.Tensor, timer: Timer) -> torch.Tensor:
        """The row-parallel layers' (O, down) partial sums: complete on one device."""
        return partial

    def lm_logits(self, h: torch.Tensor, timer: Timer) -> torch.Tensor:
        """Logits [B, vocab] of the final hidden state."""
        return F.linear(h, self.model.lm_head)

    def speculated_query(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Layer j's query speculated from `x`, the residual stream entering layer j - 1
        (lookahead_query=projected): layer j's RMSNorm, the query rows of its QKV weight (one
        [hidden x q_heads*head_dim] GEMV) and RoPE at this step's position. [B, H, D]."""
        s, lw = self.model.s, self.model.layers[j]
        q = F.linear(rms_norm(x, lw["n1"]), lw["qkv"][:s.q_heads * s.head_dim])
        return apply_rope(q.view(self.B, s.q_heads, s.head_dim), self.cos, self.sin)

    # -- attention per placement: writes self.attn_out [B, H, D] --
    def attention(self, placement, i, q, k, v, timer, sparse_layer, ahead=None):
        s, B, L = self.model.s, self.B, self.L
        kv = self.caches[i]
        if placement == "dense-sdpa":
            view = kv.view(2, B, L, s.kv_heads, s.head_dim)
            view[0, :, L - 1] = k
            view[1, :, L - 1] = v
            timer.mark("append")
            kk = view[0].transpose(1, 2)  # [B, KVH, L, D], strided view, no copy
            vv = view[1].transpose(1, 2)
            with self._sdpa_ctx():
                o = _sdpa(self.sdpa_form, q, kk, vv, s.head_dim ** -0.5)
            self.attn_out.copy_(o.reshape(B, s.q_heads, s.head_dim))
            timer.mark("apply")
            return
        layer = self.paged[placement][i]
        if placement.startswith("fpga-"):
            # append (+ the new keys to the card) | submit .. wait (marked inside) | decode
            layer.append(kv, self.slots, k, v, self.digests[i])
            timer.mark("prepare")
            layer.decode(q, kv, self.block_table, self.seq_lens, self.attn_out, self.digests[i],
                         lookahead_query=ahead)
            timer.mark("apply")
            return
        step1 = "prepare" if placement == "gpu" else "append"
        layer.append(kv, self.slots, k, v, self.digests[i])
        timer.mark(step1)
        if not layer.sparse:
            layer.decode(q, kv, self.block_table, self.seq_lens, self.attn_out, self.digests[i])
            timer.mark("apply")
            return
        # The layer's two sparse calls, split so the profiled run can time them apart.
        import mempipe
        c = layer.config
        pages, counts, select_ws, decode_ws = self.plan.views(
            B, s.q_heads, s.kv_heads, self.blocks, c.budget // c.page_size, q.device)
        mempipe._mempipe.score_and_select(q, kv, self.digests[i], self.block_table,
                                          self.seq_lens, pages, counts, budget=c.budget,
                                          sinks=c.sinks, locals=c.locals,
                                          aggregation=c.aggregation, workspace=select_ws)
        timer.mark("relevancy")
        mempipe._mempipe.sparse_decode(q, kv, self.block_table, self.seq_lens, pages, counts,
                                       self.attn_out, layer.scale,
                                       num_threads=layer.num_threads, workspace=decode_ws)
        layer.calls["sparse"] += 1
        timer.mark("apply")

    def _sdpa_ctx(self):
        from torch.nn.attention import sdpa_kernel
        if self.sdpa_backend is None:
            return contextlib.nullcontext()  # CPU: torch's own choice
        return sdpa_kernel([self.sdpa_backend])

    def step(self, placement: str, timer: Timer):
        """One decode step of the whole batch; logits into self.logits."""
        m, s, B = self.model, self.model.s, self.B
        timer.start()
        x = m.embed[self.tokens]  # [B, hidden]
        for i, lw in enumerate(m.layers):
            h = rms_norm(x, lw["n1"])
            qkv = F.linear(h, lw["qkv"])
            qk, v = qkv.split([(s.q_heads + s.kv_heads) * s.head_dim,
                               s.kv_heads * s.head_dim], dim=-1)
            # Q and K rotated together (3 kernels), then split into contiguous tensors.
            qk = apply_rope(qk.view(B, s.q_heads + s.kv_heads, s.head_dim), self.cos, self.sin)
            q = qk[:, :s.q_heads].contiguous()
            k = qk[:, s.q_heads:].contiguous()
            v = v.reshape(B, s.kv_heads, s.head_dim).contiguous()
            timer.mark("linear")
            ahead = None
            if placement in self.speculate and i + 1 < s.layers:
                ahead = self.speculated_query(x, i + 1)  # x: the residual entering layer i
                timer.mark("speculate")
            self.attention(placement, i, q, k, v, timer, None, ahead)
            x = x + self.reduce(F.linear(self.attn_out.view(B, -1), lw["o"]), timer)
            h = rms_norm(x, lw["n2"])
            gu = F.linear(h, lw["gate_up"])
            gate, up = gu.chunk(2, dim=-1)
            x = x + self.reduce(F.linear(F.silu(gate) * up, lw["down"]), timer)
            timer.mark("linear")
        self.logits.copy_(self.lm_logits(rms_norm(x, m.norm), timer))
        timer.mark("linear")

    def pick_sdpa_backend(self):
        """The fastest (SDPA backend, query layout) on this configuration's layer-0 attention:
        layouts `rows` (a GQA group's query heads as query rows over its KV head) and `gqa`
        (one query row per head, enable_gqa=True)."""
        s, B, L = self.model.s, self.B, self.L
        if self.model.device.type != "cuda":
            self.sdpa_form = "rows"
            return "default backend, rows (CPU)"
        view = self.caches[0].view(2, B, L, s.kv_heads, s.head_dim)
        q = torch.randn(B, s.q_heads, s.head_dim, dtype=self.model.dtype,
                        device=self.model.device)
        kk, vv = view[0].transpose(1, 2), view[1].transpose(1, 2)
        from torch.nn.attention import sdpa_kernel
        best, tried = None, []
        for b in _sdpa_backends():
            for form in ("rows", "gqa"):
                try:
                    with sdpa_kernel([b]):
                        _sdpa(form, q, kk, vv, 1.0)
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(5):
                            _sdpa(form, q, kk, vv, 1.0)
                        torch.cuda.synchronize()
                        t = (time.perf_counter() - t0) / 5
                except RuntimeError:
                    tried.append(f"{b.name}/{form}: does not run")
                    continue
                tried.append(f"{b.name}/{form}: {t * 1e3:.3f} ms")
                if best is None or t < best[2]:
                    best = (b, form, t)
        if best is None:
            raise RuntimeError("no SDPA backend runs this shape: " + "; ".join(tried))
        self.sdpa_backend, self.sdpa_form = best[0], best[1]
        print("[model_decode]   SDPA layer-0 attention: " + "; ".join(tried), flush=True)
        return f"{best[0].name}, {best[1]}"


def _sdpa(form, q, kk, vv, scale):
    """q [B, H, D] over kk, vv [B, KVH, L, D] (strided views of the cache)."""
    B, H, D = q.shape
    kvh = kk.shape[1]
    if form == "rows":
        return F.scaled_dot_product_attention(q.view(B, kvh, H // kvh, D), kk, vv, scale=scale)
    return F.scaled_dot_product_attention(q.view(B, H, 1, D), kk, vv, scale=scale,
                                          enable_gqa=True)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION)  # MATH would materialize; not a contender


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------
class Energy:
    """NVML's total-energy counter (mJ) of the device, or None where unavailable."""

    def __init__(self, device: torch.device):
        self.handle = None
        self.why = "CPU run" if device.type != "cuda" else None
        if device.type == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                self.nv = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            except Exception as e:  # noqa: BLE001 -- reported, the run goes on without energy
                self.handle, self.why = None, f"NVML energy counter unavailable: {e}"

    def read_j(self):
        if self.handle is None:
            return None
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) over 2 GiB."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * 20 / (time.perf_counter() - t0)
    del a, b
    return bw


def _fpga_state(runner: Runner, placement: str):
    """(SchemeState, SelectionOffload) of an fpga row, else (None, None)."""
    if not placement.startswith("fpga-"):
        return None, None
    cfg = runner.cfgs[placement]
    return runner.plan.schemes(cfg), runner.plan.offload(cfg, runner.model.device)


def capture_graphs(eager, count: int) -> list:
    """`count` CUDA graphs of one eager step each (`eager()`: one step), captured after 2 x
    count warm-up steps on a side stream: a reuse cycle's steps differ, so one graph per step
    of the cycle, replayed in order (replayer)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2 * count):
            eager()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphs = []
    for _ in range(count):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            eager()
        graphs.append(g)
    return graphs


def replayer(graphs: list, eager):
    """run_once(): the next graph of the cycle replayed, or one eager step without graphs."""
    it = {"k": 0}

    def run_once():
        if graphs:
            graphs[it["k"] % len(graphs)].replay()
            it["k"] += 1
        else:
            eager()

    return run_once


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def steps_for_window(run_once, cycle: int, args, cuda: bool) -> int:
    """Timed steps: at least --steps, grown until --min_window_s at the rate of one cycle timed
    after 2 warm cycles; whole cycles (a multiple of `cycle`)."""
    for _ in range(2 * cycle):
        run_once()
    _sync(cuda)
    t0 = time.perf_counter()
    for _ in range(cycle):
        run_once()
    _sync(cuda)
    one = (time.perf_counter() - t0) / cycle
    steps = max(args.steps, math.ceil(args.min_window_s / max(one, 1e-6)))
    return -(-steps // cycle) * cycle


def timed_steps(run_once, steps: int, cuda: bool) -> tuple[list[float], float]:
    """(ms of each of `steps` calls of run_once, the window's wall seconds): CUDA events
    between the calls on the GPU, perf_counter around each on the CPU."""
    times = []
    w0 = time.perf_counter()
    if cuda:
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        evs[0].record()
        for i in range(steps):
            run_once()
            evs[i + 1].record()
        _sync(cuda)
        times = [a.elapsed_time(b) for a, b in zip(evs, evs[1:])]
    else:
        for _ in range(steps):
            t = time.perf_counter()
            run_once()
            times.append((time.perf_counter() - t) * 1e3)
    return times, time.perf_counter() - w0


def measure(runner: Runner, placement: str, args, energy: Energy, log) -> dict:
    dev = runner.model.device
    cuda = dev.type == "cuda"
    st, off = _fpga_state(runner, placement)
    # A step's work depends on the step for reuse (fresh / reused / taking in): one graph per
    # step of the cycle, replayed in order; replays always run whole cycles.
    cycle = runner.cfgs[placement].reuse if st is not None else 1
    # Profiled eager steps (also the warm-up that sizes every buffer, and for look-ahead the
    # step that lets every layer see its successor's digests).
    for _ in range(cycle):
        runner.step(placement, Timer(dev, False))
    prof = Timer(dev, True)
    if st is not None:
        st.marker = prof.mark
    runner.step(placement, prof)
    if st is not None:
        st.marker = None
    profiled = prof.totals()
    # Look-ahead's speculated query is linear-layer work: in `linear`, also reported apart.
    speculate_ms = profiled.pop("speculate", 0.0)
    profiled["linear"] += speculate_ms
    for _ in range(cycle - 1):  # back to the start of a cycle
        runner.step(placement, Timer(dev, False))

    def eager():
        runner.step(placement, Timer(dev, False))

    graphs = capture_graphs(eager, cycle) if cuda else []
    run_once = replayer(graphs, eager)
    steps = steps_for_window(run_once, cycle, args, cuda)
    if off is not None:
        off.reset_metrics()
    e0 = energy.read_j()
    times, window = timed_steps(run_once, steps, cuda)
    e1 = energy.read_j()
    offload = off.metrics() if off is not None else None
    step_ms = statistics.median(times)
    joules = None if e0 is None else (e1 - e0)
    recall = measure_recall(runner, placement, args, st) if st is not None else None
    return {"graph": graphs or None, "step_ms": step_ms, "steps": steps, "window_s": window,
            "profiled_ms": profiled, "energy_j": joules,
            "mean_step_ms": statistics.fmean(times), "offload": offload, "recall": recall,
            "speculate_ms_profiled": speculate_ms}


def measure_recall(runner: Runner, placement: str, args, st) -> dict:
    """Selection recall of the scheme's selections against the exact selection of the same
    step and layer, over --recall_steps eager steps, each with fresh random input tokens (else
    every step would repeat the same query and reuse would be exact by construction). The
    inputs are restored after."""
    saved = runner.tokens.clone()
    gen = torch.Generator(device=runner.model.device).manual_seed(args.seed + 7)
    st.recall.clear()
    st.profile_recall = True
    cycle = runner.cfgs[placement].reuse
    try:
        # Whole reuse cycles, so the captured graphs replayed after stay in phase.
        for _ in range(-(-args.recall_steps // cycle) * cycle):
            runner.tokens.copy_(torch.randint(0, runner.model.s.vocab, saved.shape,
                                              generator=gen, device=saved.device))
            runner.step(placement, Timer(runner.model.device, False))
    finally:
        st.profile_recall = False
        runner.tokens.copy_(saved)
    return st.report()["recall"]


def bytes_moved(s: Shape, L: int, B: int, args, placement: str, elem: int) -> dict:
    weights = weight_params(s) * elem
    kv_tok = 2 * s.kv_heads * s.head_dim * elem  # one layer, one token, K and V
    if placement in ("gpu", "fpga"):
        sparse_layers = max(0, s.layers - args.dense_layers)
        dense_layers = s.layers - sparse_layers
        kept = min(L, args.budget)
        kv = B * kv_tok * (dense_layers * L + sparse_layers * kept)
        digests = B * sparse_layers * (L // args.page) * kv_tok  # (max, min) per page
    else:
        kv = B * kv_tok * s.layers * L
        digests = 0
    if placement == "fpga":  # the card scans the digests, not the GPU (its HBM, modeled)
        return {"weights": weights, "kv": kv, "digests": 0, "pcie": 0,
                "card_digests_modeled": digests}
    return {"weights": weights, "kv": kv, "digests": digests, "pcie": 0}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def batch_sizes(spec: str, bmax: int) -> list[int]:
    """--batches (comma list; `max` = bmax) as distinct batch sizes, in order."""
    want = []
    for b in spec.split(","):
        nb = bmax if b == "max" else int(b)
        if nb not in want:
            want.append(nb)
    return want


def dense_reference(results: dict, outs: dict):
    """(the faster dense placement's step_ms, the reference outputs: dense-sdpa's, else
    dense-paged's); each None when no dense placement ran."""
    dense_best = min((results[p]["step_ms"] for p in results if p.startswith("dense")),
                     default=None)
    return dense_best, outs.get("dense-sdpa", outs.get("dense-paged"))


def max_batch(s: Shape, L: int, args, free_bytes: int, elem: int) -> int:
    per_seq = L * kv_bytes_per_token(s, elem) * (1 + 1 / args.page)  # KV + digests
    avail = free_bytes - args.headroom_gib * (1 << 30)
    return max(0, int(avail // per_seq))


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def validate(doc: dict) -> list[str]:
    """Problems of a `mempipe.throughput/1` document written by this runner (empty: valid)."""
    bad = []
    if doc.get("schema") != SCHEMA:
        bad.append(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("kind") not in ("measured", "modeled"):
        bad.append(f"kind must be measured or modeled, got {doc.get('kind')!r}")
    for k in ("machine", "command", "date_utc", "model", "config", "rows"):
        if k not in doc:
            bad.append(f"missing top-level key {k!r}")
    for i, r in enumerate(doc.get("rows", [])):
        where = f"rows[{i}] ({r.get('placement')}, {r.get('context')}, {r.get('batch')})"
        for k in ("placement", "scheme", "context", "batch", "step_ms", "ms_per_token",
                  "tokens_per_s", "steps_ms", "memory_processing_share", "bytes",
                  "byte_floor_ms", "speedup_over_dense", "energy_j_per_token",
                  "gpu_energy_j_per_token", "fpga_energy_j_per_token", "energy_source",
                  "rel_err", "fits", "notes"):
            if k not in r:
                bad.append(f"{where}: missing {k!r}")
        if bad:
            continue
        if r["step_ms"] is None:  # a gap row: nothing measured, it must say why
            if not r["notes"]:
                bad.append(f"{where}: a row without step_ms must carry a note")
            continue
        if not (r["step_ms"] > 0 and math.isfinite(r["step_ms"])):
            bad.append(f"{where}: step_ms must be positive, got {r['step_ms']}")
            continue
        if abs(r["ms_per_token"] - r["step_ms"]) > 1e-9 * r["step_ms"]:
            bad.append(f"{where}: ms_per_token {r['ms_per_token']} != step_ms {r['step_ms']}")
        want_tps = r["batch"] * 1000.0 / r["step_ms"]
        if abs(r["tokens_per_s"] - want_tps) > 1e-6 * want_tps:
            bad.append(f"{where}: tokens_per_s {r['tokens_per_s']} != batch*1000/step_ms "
                       f"{want_tps}")
        if set(r["steps_ms"]) != set(STAGES):
            bad.append(f"{where}: steps_ms keys {sorted(r['steps_ms'])} != {list(STAGES)}")
        else:
            total = sum(r["steps_ms"].values())
            if any(v < 0 for v in r["steps_ms"].values()) or \
                    abs(total - r["step_ms"]) > 1e-6 * r["step_ms"]:
                bad.append(f"{where}: steps_ms sum {total} != step_ms {r['step_ms']}")
            mp = sum(r["steps_ms"][k] for k in ("prepare", "relevancy", "retrieval"))
            if abs(mp / r["step_ms"] - r["memory_processing_share"]) > 1e-6:
                bad.append(f"{where}: memory_processing_share {r['memory_processing_share']} "
                           f"!= (prepare+relevancy+retrieval)/step {mp / r['step_ms']}")
        if r["speedup_over_dense"] is None:
            # Only where no dense placement ran for this configuration (NO_DENSE_NOTE).
            if dense_ran(doc, r):
                bad.append(f"{where}: speedup_over_dense is missing but a dense placement ran "
                           f"at this context and batch")
            elif NO_DENSE_NOTE not in r["notes"]:
                bad.append(f"{where}: a row without speedup_over_dense must carry the note "
                           f"{NO_DENSE_NOTE!r}")
        elif not r["speedup_over_dense"] > 0:
            bad.append(f"{where}: speedup_over_dense must be positive")
        if r["placement"] == "fpga":
            f = r.get("fpga")
            if not isinstance(f, dict):
                bad.append(f"{where}: an fpga row must carry its 'fpga' figures")
                continue
            for k in ("card_modeled_ms_per_step", "gpu_wait_ms_per_step_profiled",
                      "hidden_share", "fallbacks", "host_bound", "recall"):
                if k not in f:
                    bad.append(f"{where}: fpga figures miss {k!r}")
            hs = f.get("hidden_share")
            if hs is not None and not 0 <= hs <= 1:
                bad.append(f"{where}: hidden_share must be in [0, 1], got {hs}")
    return bad


def dense_ran(doc: dict, row: dict) -> bool:
    """Whether `doc` has a measured dense row at `row`'s context and batch."""
    return any(d["placement"] == "dense" and d.get("step_ms") is not None
               and (d["context"], d["batch"]) == (row["context"], row["batch"])
               for d in doc.get("rows", []))


def _ratio(a, b) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}x"


def _ctx(L: int) -> str:
    if L % (1 << 20) == 0:
        return f"{L >> 20}M"
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def markdown(doc: dict) -> str:
    m = doc["model"]
    lines = [f"Measured on {doc['machine'].get('gpu') or doc['machine'].get('host')}, "
             f"{doc['date_utc']}; model {m['name']} (random weights, {doc['config']['dtype']}); "
             f"page {doc['config']['page']}, budget {doc['config']['budget']}, "
             f"{doc['config']['dense_layers']} dense layers.", "",
             "Command: `" + doc["command"] + "`", "",
             "| context | batch | placement | ms/token | tokens/s | speedup | append | prepare |"
             " relevancy+retrieval | apply | linear | mem. proc. | bytes / floor | floor (copy) |"
             " J/token | rel. err | notes |",
             "|" + "---|" * 17]
    for r in doc["rows"]:
        name = r["placement"] + (f" ({r['variant']})" if r.get("variant") else "")
        if r["step_ms"] is None:
            lines.append(f"| {_ctx(r['context'])} | {r['batch']} | {name} |" + " — |" * 13
                         + " " + "; ".join(r["notes"]) + " |")
            continue
        st = r["steps_ms"]
        e = r["energy_j_per_token"]
        err = r["rel_err"]
        lines.append(
            f"| {_ctx(r['context'])} | {r['batch']} | {name} | {r['step_ms']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {_ratio(r['speedup_over_dense'], 1)} | "
            f"{st['append']:.3f} | "
            f"{st['prepare']:.3f} | {st['relevancy'] + st['retrieval']:.3f} | "
            f"{st['apply']:.3f} | {st['linear']:.3f} | {r['memory_processing_share']:.1%} | "
            f"{_ratio(r['step_ms'], r['byte_floor_ms'])} | "
            f"{_ratio(r['step_ms'], r['byte_floor_copy_ms'])} | "
            f"{'—' if e is None else f'{e:.3f}'} | {'—' if err is None else f'{err:.2e}'} | "
            f"{'; '.join(r['notes'])} |")
    fpga = [r for r in doc["rows"] if r["placement"] == "fpga" and r["step_ms"] is not None]
    if fpga:
        lines += ["", "fpga rows (emulated U55C; card time, card bytes and fpga energy "
                  "**modeled**; recall over random tokens of a random-weight model):", "",
                  "| context | batch | scheme | ms/token | card ms/step (modeled) | GPU wait "
                  "ms/step | hidden | fallbacks | host-bound | PCIe GPU<->host B/step | "
                  "host<->card B/step (modeled) | fpga J/token (modeled) | recall |",
                  "|" + "---|" * 13]
        for r in fpga:
            f = r["fpga"]
            fb = ", ".join(f"{k} {v}" for k, v in f["fallbacks"].items() if v) or "0"
            rec = ", ".join(f"{k} {v:.3f}" for k, v in (f["recall"] or {}).items()
                            if v is not None) or "—"
            hs = f["hidden_share"]
            fj = r["fpga_energy_j_per_token"]
            lines.append(
                f"| {_ctx(r['context'])} | {r['batch']} | {r['variant']} | {r['step_ms']:.3f} | "
                f"{f['card_modeled_ms_per_step']:.3f} | "
                f"{f['gpu_wait_ms_per_step']:.3f} | "
                f"{'—' if hs is None else f'{hs:.1%}'} | {fb} | {f['host_bound']} | "
                f"{r['bytes']['pcie']:.0f} | {r['bytes']['card_modeled']:.0f} | "
                f"{'—' if fj is None else f'{fj:.4f}'} | {rec} |")
    return "\n".join(lines) + "\n"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The flags this runner and model_decode_tp.py share (the module docstrings say what they
    mean); defaults of None are filled per --device by each runner."""
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--contexts", default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dense_layers", type=int, default=None)
    ap.add_argument("--sinks", type=int, default=1)
    ap.add_argument("--locals", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--min_window_s", type=float, default=None)
    ap.add_argument("--hbm_tbs", type=float, default=4.8)
    ap.add_argument("--headroom_gib", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--seed", type=int, default=1)


def fill_device_defaults(args, contexts: tuple, batches: tuple, steps: tuple) -> None:
    """The shared flags left unset, filled for --device: (cpu, cuda) pairs for --contexts,
    --batches and --steps (each runner's own); --model tiny / llama3-8b, --dense_layers 1 / 2,
    --budget 64 / 4096, --min_window_s 0 / 0.5."""
    i = 0 if args.device == "cpu" else 1
    args.model = args.model or ("tiny", "llama3-8b")[i]
    args.contexts = args.contexts or contexts[i]
    args.batches = args.batches or batches[i]
    args.steps = args.steps or steps[i]
    if args.dense_layers is None:
        args.dense_layers = (1, 2)[i]
    args.budget = args.budget or (64, 4096)[i]
    if args.min_window_s is None:
        args.min_window_s = (0.0, 0.5)[i]


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--fpga_schemes", default=",".join(DEFAULT_FPGA_SCHEMES))
    ap.add_argument("--deadline_ms", type=float, default=100.0)
    ap.add_argument("--fpga_fallback", default="gpu", choices=("gpu", "dense"))
    ap.add_argument("--recall_steps", type=int, default=5)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    fill_device_defaults(args, contexts=("256,512", "32768,131072,524288"),
                         batches=("1,2", "1,8,max"), steps=(3, 10))
    if cpu:
        torch.set_num_threads(1)  # the smoke run shares small CI machines
    placements = [p for p in args.placements.split(",") if p]
    for p in placements:
        if p not in PLACEMENTS + ("fpga",):
            raise ValueError(f"--placements: unknown placement {p!r}; one of "
                             f"{', '.join(PLACEMENTS + ('fpga',))}")
    args.fpga_list = []
    if "fpga" in placements:
        args.fpga_list = [f for f in args.fpga_schemes.split(",") if f]
        for f in args.fpga_list:
            if f not in FPGA_SCHEMES:
                raise ValueError(f"--fpga_schemes: unknown scheme {f!r}; one of "
                                 f"{', '.join(FPGA_SCHEMES)}")
        if not args.fpga_list:
            raise ValueError("--fpga_schemes: no scheme given")
        placements = [p for p in placements if p != "fpga"] + ["fpga-" + f
                                                               for f in args.fpga_list]
        from mempipe import schemes as mempipe_schemes
        if not mempipe_schemes.has_offload():
            raise RuntimeError("--placements fpga needs _mempipe.SelectionOffload, which this "
                               "build of mempipe lacks")
    warn = no_dense_message(placements)
    if warn:
        print(f"[model_decode] note: {warn}", flush=True)
    if args.recall_steps < 1:
        raise ValueError(f"--recall_steps must be >= 1, got {args.recall_steps}")
    if not (args.deadline_ms > 0 and math.isfinite(args.deadline_ms)):
        raise ValueError(f"--deadline_ms must be a positive number, got {args.deadline_ms}")
    contexts = [int(c) for c in args.contexts.split(",")]
    for c in contexts:
        if c <= 0 or c % args.page:
            raise ValueError(f"--contexts: {c} is not a positive multiple of --page {args.page}")
    if args.budget % args.page:
        raise ValueError(f"--budget {args.budget} is not a multiple of --page {args.page}")

    import mempipe
    if not cpu and ("cuda" not in mempipe.devices or not torch.cuda.is_available()):
        raise RuntimeError(f"--device cuda needs a CUDA device and a GPU build of mempipe "
                           f"(module runs {mempipe.devices}, torch.cuda.is_available()="
                           f"{torch.cuda.is_available()})")
    dev = torch.device("cpu" if cpu else "cuda", None if cpu else 0)
    shape = MODELS[args.model]
    dtype = torch.float32 if cpu else torch.bfloat16
    elem = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    print(f"[model_decode] seed {args.seed}; {shape.name}: {weight_params(shape) / 1e9:.2f} B "
          f"parameters read per step, {dtype}, device {dev}", flush=True)
    t0 = time.perf_counter()
    model = Model(shape, dtype, dev, gen)
    if not cpu:
        torch.cuda.synchronize()
    print(f"[model_decode] weights built in {time.perf_counter() - t0:.1f} s", flush=True)
    energy = Energy(dev)
    machine = {"torch": torch.__version__, "mempipe_devices": list(mempipe.devices)}
    copy_bps = None
    if not cpu:
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / (1 << 30), 1),
                       cuda=torch.version.cuda, nvml_energy=energy.why or "ok")
        copy_bps = copy_bandwidth(dev)
        machine["copy_bandwidth_tbs"] = round(copy_bps / 1e12, 3)
        print(f"[model_decode] {machine['gpu']}: device copy bandwidth "
              f"{copy_bps / 1e12:.2f} TB/s", flush=True)
    else:
        machine.update(gpu=None, host=f"CPU ({os.cpu_count()} threads)")
    floor_bps = args.hbm_tbs * 1e12

    rows = []
    configs = []
    for L in contexts:
        if cpu:
            free = 1 << 40
        else:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(0)[0]
        bmax = max_batch(shape, L, args, free, elem)
        configs += [(L, B, bmax) for B in batch_sizes(args.batches, bmax)]
    for L, B, bmax in configs:
        if B < 1 or B > bmax:
            print(f"[model_decode] {_ctx(L)} x {B}: does not fit (largest batch {bmax})",
                  flush=True)
            rows.append(gap_row("dense", L, B, f"does not fit: weights + KV exceed free "
                                f"memory (largest batch at {_ctx(L)} is {bmax})",
                                variant="sdpa"))
            continue
        t0 = time.perf_counter()
        try:
            runner = Runner(model, L, B, args, gen)
        except torch.OutOfMemoryError as e:
            print(f"[model_decode] {_ctx(L)} x {B}: out of memory filling the cache: {e}",
                  flush=True)
            rows.append(gap_row("dense", L, B, f"does not fit: out of memory while filling the "
                                f"cache (estimated largest batch {bmax})", variant="sdpa"))
            torch.cuda.empty_cache()
            continue
        backend = runner.pick_sdpa_backend() if "dense-sdpa" in placements else None
        print(f"[model_decode] {_ctx(L)} x {B}: cache filled in "
              f"{time.perf_counter() - t0:.1f} s; SDPA backend {backend}", flush=True)
        results, logits = {}, {}
        for p in placements:
            r = measure(runner, p, args, energy, print)
            # The comparison step: the same input token over the same cache.
            if r["graph"] is not None:
                for g in r["graph"]:  # a whole cycle (one graph but for reuse)
                    g.replay()
                torch.cuda.synchronize()
            else:
                runner.step(p, Timer(dev, False))
            logits[p] = (runner.attn_out.clone(), runner.logits.clone())
            r.pop("graph")
            results[p] = r
            print(f"[model_decode] {_ctx(L)} x {B} {p:<11}: {r['step_ms']:.3f} ms/step, "
                  f"{B * 1000 / r['step_ms']:.1f} tokens/s ({r['steps']} steps, "
                  f"{r['window_s']:.2f} s)", flush=True)
        dense_best, ref = dense_reference(results, logits)  # ref: (attention out, logits)
        for p, r in results.items():
            rows.append(make_row(p, r, L, B, shape, args, elem, floor_bps, copy_bps,
                                 dense_best, ref, logits[p], energy, runner, backend, cpu))
        if not args.fpga_list:
            rows.append(gap_row("fpga", L, B, "gap: not run (--placements has no fpga); see "
                                "DESIGN_SPACE.md for modeled fpga rows"))
        runner.plan.shutdown()
        del runner
        if not cpu:
            torch.cuda.empty_cache()

    doc = {"schema": SCHEMA, "kind": "measured", "machine": machine,
           "command": "python3 " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]
                                            if argv is None else [__file__] + list(argv)),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "model": {**asdict(shape), "ffn": shape.ffn, "random_weights": True,
                     "weight_bytes_per_step": weight_params(shape) * elem},
           "config": {"page": args.page, "budget": args.budget, "digest": "max/min, "
                      + str(dtype).replace("torch.", ""), "dtype": str(dtype).replace(
                          "torch.", ""), "dense_layers": args.dense_layers,
                      "sinks": args.sinks, "locals": args.locals, "seed": args.seed,
                      "byte_floor_tbs": args.hbm_tbs, "min_window_s": args.min_window_s},
           "note": ("random weights and random KV; context held constant during timing; "
                    "steps split from one profiled eager step, scaled to the graph step"),
           "rows": rows, "maps": []}
    bad = validate(doc)
    if bad:
        raise RuntimeError("the runner's own JSON fails validation: " + "; ".join(bad))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"[model_decode] wrote {args.json}", flush=True)
    md = markdown(doc)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    print(md, flush=True)
    return 0


def gap_row(placement, L, B, note, variant=None) -> dict:
    r = {"placement": placement, "scheme": "sync", "micro_batches": 1, "reuse": 1,
         "context": L, "batch": B, "step_ms": None, "ms_per_token": None, "tokens_per_s": None,
         "steps_ms": {}, "memory_processing_share": None, "bytes": {}, "byte_floor_ms": None,
         "byte_floor_copy_ms": None, "speedup_over_dense": None, "energy_j_per_token": None,
         "gpu_energy_j_per_token": None, "fpga_energy_j_per_token": None,
         "energy_source": None, "rel_err": None, "fits": None, "notes": [note]}
    if variant:
        r["variant"] = variant
    return r


def make_row(p, r, L, B, shape, args, elem, floor_bps, copy_bps, dense_best, ref, lg, energy,
             runner, backend, cpu) -> dict:
    step = r["step_ms"]
    prof = r["profiled_ms"]
    total = sum(prof.values())
    steps = {k: step * prof[k] / total for k in STAGES}
    # Rounding: make the split sum to step_ms exactly (the largest stage absorbs it).
    big = max(steps, key=steps.get)
    steps[big] += step - sum(steps.values())
    mp = sum(steps[k] for k in ("prepare", "relevancy", "retrieval"))
    by = bytes_moved(shape, L, B, args, "dense" if p.startswith("dense") else
                     "fpga" if p.startswith("fpga-") else "gpu", elem)
    nbytes = sum(by.values())
    if p.startswith("fpga-"):
        placement, variant = "fpga", p[len("fpga-"):]
    else:
        placement, variant = {"dense-sdpa": ("dense", "sdpa"),
                              "dense-paged": ("dense", "paged"),
                              "gpu": (runner.sparse_placement, None)}[p]
    notes = []
    if p == "dense-sdpa":
        notes.append(f"torch SDPA backend {backend}" + ("" if cpu else ", CUDA graph"))
    elif p == "dense-paged":
        notes.append("append = fused append+digest kernel (the GPU build has no bare write)")
    elif placement == "fpga":
        notes.append("prepare = append (+ new keys to the card); relevancy = submit and host "
                     "launch; retrieval = the decode device waiting for the card (profiled "
                     "step); apply = fallback + decode")
    else:
        notes.append("prepare = fused append+digest; relevancy = fused score+top-k "
                     "(retrieval inside it)")
    if cpu:
        notes.append("CPU smoke: no CUDA graph")
    if dense_best is None:
        notes.append(NO_DENSE_NOTE)
    e = r["energy_j"]
    ej = None if e is None else e / (r["steps"] * B)
    row = {"placement": placement, "scheme": "sync", "micro_batches": 1, "reuse": 1,
           "context": L, "batch": B, "step_ms": step, "ms_per_token": step,
           "tokens_per_s": B * 1000.0 / step, "steps_ms": steps,
           "memory_processing_share": mp / step, "bytes": by,
           "byte_floor_ms": nbytes / floor_bps * 1e3,
           "byte_floor_copy_ms": (nbytes / copy_bps * 1e3) if copy_bps else None,
           "speedup_over_dense": None if dense_best is None else dense_best / step,
           "energy_j_per_token": ej,
           "gpu_energy_j_per_token": ej, "fpga_energy_j_per_token": None,
           "energy_source": "nvml" if ej is not None else None,
           "rel_err": rel_l2(lg[0], ref[0]) if (ref is not None and lg is not ref) else None,
           "rel_err_logits": rel_l2(lg[1], ref[1]) if (ref is not None and lg is not ref)
           else None,
           "fits": True, "notes": notes, "profiled_ms": prof, "timed_steps": r["steps"],
           "timed_window_s": r["window_s"], "mean_step_ms": r["mean_step_ms"]}
    if variant:
        row["variant"] = variant
    if placement == "fpga":
        fpga_fields(row, r, runner.cfgs[p], B, steps)
    return row


REASONS = ("timeout", "error", "dead", "invalid", "busy")


def _by_reason(m: dict, key: str) -> dict:
    v = m.get(key) or {}
    if isinstance(v, dict):
        return {k: int(n) for k, n in v.items() if k not in ("selected", "none")}
    return {name: int(v[i + 1]) for i, name in enumerate(REASONS) if i + 1 < len(v)}


def fpga_fields(row: dict, r: dict, cfg, B: int, steps_ms: dict) -> None:
    """The fpga row's own figures, from the engine's metrics over the timed window."""
    m = r["offload"] or {}
    n = r["steps"]
    row["scheme"] = ("pipelined" if cfg.mode == "pipelined" else
                     "reuse" if cfg.reuse > 1 else "lookahead" if cfg.lookahead else "sync")
    row["micro_batches"], row["reuse"] = cfg.micro_batches, cfg.reuse
    row["reuse_async"], row["lookahead"] = cfg.reuse_async, cfg.lookahead
    row["lookahead_query"] = cfg.lookahead_query if cfg.lookahead else None
    card_ms = float(m.get("modeled_device_ms", 0.0)) / n
    # The decode device's wait for the card: the engine's wait-kernel time over the timed
    # window where it measures one (CUDA), else the profiled eager step's (CPU mode).
    measured_wait = float(m.get("gpu_wait_ms", 0.0)) / n
    wait_ms = measured_wait if measured_wait > 0 else r["profiled_ms"]["retrieval"]
    row["fpga"] = {
        "card_modeled_ms_per_step": card_ms,
        "gpu_wait_ms_per_step": wait_ms,
        "gpu_wait_ms_per_step_profiled": r["profiled_ms"]["retrieval"],
        "hidden_share": (max(0.0, min(1.0, 1.0 - wait_ms / card_ms)) if card_ms > 0 else None),
        "hidden_share_from": ("wait kernel, timed window" if measured_wait > 0 else
                              "profiled eager step"),
        "requests_per_step": float(m.get("requests", 0)) / n,
        "fallbacks": _by_reason(m, "fallbacks"),
        "gpu_wait_ms_per_step_measured": measured_wait,
        "host_bound": int(m.get("host_bound", 0)),
        "selector_ms_per_step_measured": float(m.get("selector_ms", 0.0)) / n,
        "functional": cfg.fpga_functional, "backend": cfg.fpga_backend,
        "paced": cfg.fpga_paced, "deadline_ms": cfg.deadline_ms,
        "fallback": cfg.fpga_fallback,
        "recall": r["recall"],
        # lookahead_query=projected: the speculated queries' RMSNorm + GEMV + RoPE, per step
        # (profiled eager step, not scaled; included in steps_ms['linear'])
        "speculate_ms_per_step_profiled": r.get("speculate_ms_profiled", 0.0),
        "metrics": m,
    }
    pcie = (float(m.get("bytes_d2h", 0.0)) + float(m.get("bytes_h2d", 0.0))) / n
    card = (float(m.get("modeled_bytes_to_card", 0.0))
            + float(m.get("modeled_bytes_from_card", 0.0))) / n
    row["bytes"] = {**row["bytes"], "pcie": pcie, "card_modeled": card}
    mj = m.get("modeled_energy_mj")
    fj = None if mj is None else float(mj) / 1e3 / (n * B)
    row["fpga_energy_j_per_token"] = fj
    if row["gpu_energy_j_per_token"] is not None and fj is not None:
        row["energy_j_per_token"] = row["gpu_energy_j_per_token"] + fj
        row["energy_source"] = "nvml + modeled fpga"
    elif fj is not None:
        row["energy_source"] = "modeled fpga only"
    row["notes"].append(f"emulated U55C ({cfg.fpga_backend}, "
                        f"{'paced' if cfg.fpga_paced else 'unpaced'}, functional="
                        f"{cfg.fpga_functional}); card time, card bytes and fpga energy modeled; "
                        "GPU<->host copies real")
    if cfg.lookahead:
        row["notes"].append(
            f"look-ahead query {cfg.lookahead_query}" + (
                f" (speculated: L+1's RMSNorm + W_q + RoPE on L's input, "
                f"{row['fpga']['speculate_ms_per_step_profiled']:.3f} ms/step profiled, in "
                "linear)" if cfg.lookahead_query == "projected" else " (layer L's own query)"))
    hb = row["fpga"]["host_bound"]
    if hb:
        measured = row["fpga"]["selector_ms_per_step_measured"]
        row["notes"].append(f"host-bound: {hb} requests finished on this host after their "
                            f"modeled time (measured selector {measured:.2f} ms/step vs "
                            f"modeled card {card_ms:.2f} ms/step)")
    # The engine's append ring, the timeouts of a late card (not failures) and why it died.
    row["fpga"]["append_ring"] = m.get("append_ring")
    row["fpga"]["late_timeouts"] = int(m.get("late_timeouts", 0))
    if m.get("append_ring"):
        row["notes"].append(f"append ring {m['append_ring']} per layer")
    if row["fpga"]["late_timeouts"]:
        row["notes"].append(f"{row['fpga']['late_timeouts']} timeouts started late (the card was "
                            "behind; fallbacks, not failures)")
    if m.get("dead"):
        row["notes"].append(f"card declared dead: {m.get('death', '')}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, RuntimeError) as e:
        print(f"model_decode.py: error: {e}", file=sys.stderr)
        sys.exit(2)
