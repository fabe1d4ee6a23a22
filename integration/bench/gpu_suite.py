#!/usr/bin/env python3
"""mempipe GPU benchmark: our kernels beside PyTorch, side by side in one process, called
through the Python module's front door (mempipe._mempipe on CUDA tensors), as users call them.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16, page 16,
budget 4096 tokens, one decode query per sequence. For each (context, batch):
  dense   mempipe paged decode            vs torch SDPA over the same K/V (dense decode)
  select  mempipe fused score + top-k     vs plain torch Quest (bound, group max, topk)
  sparse  mempipe select + sparse decode  (the whole sparse step)
and the device-to-device copy bandwidth measured in the same run. Every timing is the
median over runs with L2 flushed before each (a decode layer's KV is never L2-resident),
CUDA events around the op alone (the module call included: its host cost is part of what a
user pays), after warm-up. Bandwidth is on the bytes the op must move. `host_us` is the median
wall time of the Python call itself (argument checks, DLPack, launch), measured alone.

Checks before timing, on this data (the run fails on any): dense decode of sequence 0 against
a float32 SDPA reference, within a tolerance derived from bf16 rounding and the reduction
length (see `decode_tol`), and the same check rejects an all-zero output; the GPU selection of
sequence 0 equals the CPU module's canonical selection (bit-exact scores) page for page; the
sparse output of sequence 0 against float32 attention over exactly the selected tokens.

  python3 gpu_suite.py --out results.json [--contexts 32768,131072 --batches 1,8,max]
"""
import argparse
import datetime
import json
import math
import statistics
import sys

import time

import torch
import torch.nn.functional as F

from mempipe import _mempipe as mp
from mempipe.attention import DecodePlan, PagedLayer
from mempipe.config import MempipeConfig

torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references must be float32

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, BUDGET = 32, 8, 128, 16, 4096
GROUP = Q_HEADS // KV_HEADS


UNIT_ROUNDOFF_BF16 = 2.0**-8


def decode_tol(ref, ref_abs, length):
    """Elementwise bound on |out - ref| for bf16 decode: output rounding u|o|; softmax weights
    rounded to bf16 before p.v, |sum p_i d_i v_i| <= u sum p_i |v_i| = u ref_abs; fp32
    accumulation over length + head_dim terms (8 sqrt(n) 2^-24 ref_abs, random-order bound)."""
    n = length + HEAD_DIM
    return UNIT_ROUNDOFF_BF16 * (ref.abs() + ref_abs) + 8 * math.sqrt(n) * 2.0**-24 * ref_abs


def within(out, ref, tol):
    return bool(torch.all((out.float() - ref).abs() <= tol))


def check_selection(q, kv, digests, table, lens, pages, scores, sel, cnt):
    """Sequence 0's selection (blocks 0..pages-1): (a) step 3 equals the CPU module's
    select_pages on the GPU's scores, page for page; (b) the chosen middle pages are the top
    ones by float64 Quest bounds, up to ties within the bounds' fp32 rounding, and a
    position-only choice fails the same test (unless the data makes it right)."""
    k_sel = sel.shape[2]
    mp.compute_relevancy(q, kv, digests, table, lens, scores, aggregation="max")
    cpu_sel = torch.full((1, KV_HEADS, k_sel), -1, dtype=torch.int32)
    cpu_cnt = torch.zeros(1, KV_HEADS, dtype=torch.int32)
    mp.select_pages(scores[:1].cpu(), table[:1].cpu(), lens[:1].cpu(), PAGE, cpu_sel, cpu_cnt,
                    budget=BUDGET, sinks=1, locals=1)
    assert torch.equal(cnt[0].cpu(), cpu_cnt[0]), "selection counts differ from the CPU's"
    assert torch.equal(sel[0].cpu(), cpu_sel[0]), "selected pages differ from the CPU's"
    qg = q[0].double().view(KV_HEADS, GROUP, HEAD_DIM)
    bound = torch.empty(pages, KV_HEADS, dtype=torch.float64, device=q.device)
    eps = 0.0
    for h in range(KV_HEADS):  # one KV head at a time: [P, G, D] float64
        hi = qg[h][None] * digests[:pages, 0, h, None].double()
        lo = qg[h][None] * digests[:pages, 1, h, None].double()
        bound[:, h] = torch.maximum(hi, lo).sum(-1).amax(-1)
        # fp32 rounding of a sum of D terms, canonical order: <= D 2^-24 sum|terms| (x2 margin)
        eps = max(eps, 2 * HEAD_DIM * 2.0**-24 *
                  float(torch.maximum(hi.abs(), lo.abs()).sum(-1).max()))
        del hi, lo

    def top_ok(chosen_rows):
        for h in range(KV_HEADS):
            chosen = torch.zeros(pages, dtype=torch.bool, device=bound.device)
            chosen[chosen_rows[h].long()] = True
            chosen[0] = chosen[pages - 1] = False  # sink and local pages are not chosen
            middle = torch.zeros_like(chosen)
            middle[1:pages - 1] = True
            rest = middle & ~chosen
            if chosen.any() and rest.any():
                if float(bound[chosen, h].min()) < float(bound[rest, h].max()) - eps:
                    return False
        return True

    assert top_ok(sel[0]), "selection is not the top pages by the float64 Quest bound"
    positional = torch.arange(k_sel, device=sel.device).expand(KV_HEADS, k_sel)
    assert not top_ok(positional), "the selection check accepts a position-only selection"


class Timer:
    """Median of CUDA-event timings, L2 flushed before each run."""

    def __init__(self):
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush = torch.empty(4 * l2, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, budget_s=0.6, min_runs=10, max_runs=200):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times, host = [], []
        total = 0.0
        while len(times) < max_runs and (len(times) < min_runs or total < budget_s * 1e3):
            self.flush.fill_(len(times) & 0xFF)
            s.record()
            h0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - h0)
            e.record()
            e.synchronize()
            t = s.elapsed_time(e)
            times.append(t)
            total += t
        return statistics.median(times), len(times), statistics.median(host) * 1e6


def copy_bandwidth(timer):
    n = 2 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _, _ = timer(lambda: dst.copy_(src), budget_s=1.0)
    del src, dst
    return 2 * n / (ms * 1e-3)  # read + write


def max_batch(context, free_bytes):
    per_seq = context * KV_HEADS * HEAD_DIM * 2 * 2 * (1 + 1 / PAGE) + 4096
    return max(1, int(0.80 * free_bytes // per_seq))


def run_case(timer, copy_bw, context, batch, results):
    dev = "cuda"
    pages = context // PAGE
    num_blocks = batch * pages
    torch.manual_seed(context + batch)
    kv = torch.randn(2, num_blocks, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    digests = torch.empty(num_blocks, 2, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    # Each sequence owns a contiguous run of blocks, so SDPA reads the very same bytes as a
    # [batch, kv_heads, context, head_dim] view ("BSHD" memory, as FlashAttention stores it).
    table = torch.arange(num_blocks, dtype=torch.int32, device=dev).view(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    out = torch.full_like(q, float("nan"))
    scale = 1.0 / math.sqrt(HEAD_DIM)
    u8 = lambda n: torch.empty(max(n, 16), dtype=torch.uint8, device=dev)  # noqa: E731

    mp.build_digests(kv, table, lens, digests)
    ws = u8(mp.decode_workspace_bytes(batch, Q_HEADS, KV_HEADS, pages))
    k_sel = BUDGET // PAGE
    sel = torch.full((batch, KV_HEADS, k_sel), -1, dtype=torch.int32, device=dev)
    cnt = torch.zeros(batch, KV_HEADS, dtype=torch.int32, device=dev)
    sws = u8(mp.select_workspace_bytes(batch, KV_HEADS, pages))
    scores = torch.empty(batch, KV_HEADS, pages, dtype=torch.float32, device=dev)
    sparse_ws = u8(mp.decode_workspace_bytes(batch, Q_HEADS, KV_HEADS, k_sel))
    sparse_out = torch.full_like(q, float("nan"))

    def dense():
        mp.dense_decode(q, kv, table, lens, out, scale, workspace=ws)

    def select():
        mp.score_and_select(q, kv, digests, table, lens, sel, cnt, budget=BUDGET, sinks=1,
                            locals=1, aggregation="max", workspace=sws)

    def score_only():
        mp.compute_relevancy(q, kv, digests, table, lens, scores, aggregation="max")

    def sparse_attn():
        mp.sparse_decode(q, kv, table, lens, sel, cnt, sparse_out, scale, workspace=sparse_ws)

    def sparse_step():
        select()
        sparse_attn()

    # The same sparse step one level up, as the vLLM backend and the transformers adapter run
    # it: PagedLayer.decode with its DecodePlan (placement checks, plan views, two calls).
    layer = PagedLayer(MempipeConfig(placement="gpu", budget=BUDGET, page_size=PAGE,
                                     dense_layers=0), 5, Q_HEADS, KV_HEADS, HEAD_DIM, scale,
                       plan=DecodePlan())
    layer_out = torch.full_like(q, float("nan"))

    def layer_step():
        layer.decode(q, kv, table, lens, layer_out, digests=digests)

    # torch references over the same memory.
    k_view = kv[0].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v_view = kv[1].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q4 = q.view(batch, Q_HEADS, 1, HEAD_DIM)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k_view, v_view, scale=scale, enable_gqa=True)

    dmax = digests[:, 0].view(batch, pages, KV_HEADS, HEAD_DIM).permute(0, 2, 1, 3)
    dmin = digests[:, 1].view(batch, pages, KV_HEADS, HEAD_DIM).permute(0, 2, 1, 3)
    qg = q.view(batch, KV_HEADS, GROUP, 1, HEAD_DIM)

    def torch_quest():
        s = torch.maximum(qg * dmax[:, :, None], qg * dmin[:, :, None]).sum(-1, dtype=torch.float32)
        return torch.topk(s.amax(2), min(k_sel, pages), dim=-1).indices

    # Correctness on this data before timing (sequence 0; see the module docstring).
    dense()
    select()
    sparse_attn()
    ref = torch.empty(Q_HEADS, HEAD_DIM, device=dev)
    ref_abs = torch.empty_like(ref)
    for h in range(KV_HEADS):  # float32 attention per KV head: [GROUP, context] weights
        kh, vh = k_view[0, h].float(), v_view[0, h].float()
        p = torch.softmax(q[0, h * GROUP:(h + 1) * GROUP].float() @ kh.T * scale, dim=-1)
        ref[h * GROUP:(h + 1) * GROUP] = p @ vh
        ref_abs[h * GROUP:(h + 1) * GROUP] = p @ vh.abs()
        del kh, vh, p
    tol = decode_tol(ref, ref_abs, context)
    dense_err = (out[0].float() - ref).abs().max().item()
    assert within(out[0], ref, tol), \
        f"dense decode differs from the fp32 reference by {dense_err} (tolerance {tol.max():.3g})"
    assert not within(torch.zeros_like(out[0]), ref, tol), "the check accepts a zeroed output"
    del ref, ref_abs
    check_selection(q, kv, digests, table, lens, pages, scores, sel, cnt)
    layer_step()
    assert torch.equal(layer_out, sparse_out), "PagedLayer.decode differs from the module calls"
    sparse_err = 0.0
    for h in range(KV_HEADS):
        tok = (sel[0, h].long()[:, None] * PAGE + torch.arange(PAGE, device=dev)).flatten()
        kk, vv = k_view[0, h, tok].float(), v_view[0, h, tok].float()
        qq = q[0, h * GROUP:(h + 1) * GROUP].float()
        p = torch.softmax(qq @ kk.T * scale, dim=-1)
        ref_s, ref_abs_s = p @ vv, p @ vv.abs()
        got = sparse_out[0, h * GROUP:(h + 1) * GROUP]
        sparse_err = max(sparse_err, (got.float() - ref_s).abs().max().item())
        assert within(got, ref_s, decode_tol(ref_s, ref_abs_s, tok.numel())), \
            f"sparse decode differs from torch over the selected tokens by {sparse_err}"

    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    digest_bytes = batch * pages * KV_HEADS * 2 * HEAD_DIM * 2
    selected_bytes = batch * KV_HEADS * min(k_sel, pages) * PAGE * HEAD_DIM * 2 * 2
    rows = {}
    for name, fn, nbytes in [
        ("mempipe_dense", dense, kv_bytes),
        ("torch_sdpa_dense", sdpa, kv_bytes),
        ("mempipe_select", select, digest_bytes),
        ("mempipe_score_only", score_only, digest_bytes),
        ("torch_quest_select", torch_quest, digest_bytes),
        ("mempipe_sparse_attn", sparse_attn, selected_bytes),
        ("mempipe_sparse_step", sparse_step, digest_bytes + selected_bytes),
        ("pagedlayer_sparse_step", layer_step, digest_bytes + selected_bytes),
    ]:
        try:
            ms, runs, host_us = timer(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows[name] = None
            continue
        bw = nbytes / (ms * 1e-3)
        rows[name] = {"ms": ms, "runs": runs, "host_us": host_us, "bytes": nbytes,
                      "GBps": bw / 1e9,
                      "frac_copy_bw": bw / copy_bw,
                      "floor_ms": nbytes / copy_bw * 1e3}
    rows["dense_max_abs_err_vs_fp32"] = dense_err
    rows["sparse_max_abs_err_vs_fp32"] = sparse_err
    ms = lambda n: rows[n]["ms"] if rows[n] else float("nan")
    frac = lambda n: rows[n]["frac_copy_bw"] if rows[n] else float("nan")
    rows["speedup_sparse_step_vs_sdpa"] = ms("torch_sdpa_dense") / ms("mempipe_sparse_step")
    rows["sparse_step_over_floor"] = ms("mempipe_sparse_step") / rows["mempipe_sparse_step"]["floor_ms"]
    rows["speedup_select_vs_torch_quest"] = ms("torch_quest_select") / ms("mempipe_select")
    results.append({"context": context, "batch": batch, **rows})
    print(f"{context // 1024:>5}K x{batch:<4} dense {ms('mempipe_dense'):8.3f} ms "
          f"({frac('mempipe_dense'):.0%})  sdpa {ms('torch_sdpa_dense'):8.3f} "
          f"({frac('torch_sdpa_dense'):.0%})  select {ms('mempipe_select'):7.3f} "
          f"({frac('mempipe_select'):.0%}; score {frac('mempipe_score_only'):.0%})  torch-quest {ms('torch_quest_select'):7.3f}  "
          f"sparse-attn {ms('mempipe_sparse_attn'):6.3f}  step {ms('mempipe_sparse_step'):7.3f} "
          f"({rows['sparse_step_over_floor']:.2f}x floor, "
          f"{rows['speedup_sparse_step_vs_sdpa']:.1f}x vs sdpa)  host us/call: dense "
          f"{rows['mempipe_dense']['host_us']:.1f} select {rows['mempipe_select']['host_us']:.1f}"
          f" sparse {rows['mempipe_sparse_attn']['host_us']:.1f}; PagedLayer step "
          f"{ms('pagedlayer_sparse_step'):7.3f} ms ({rows['pagedlayer_sparse_step']['host_us']:.1f}"
          f" us host)", flush=True)
    del kv, digests, ws, sws, sparse_ws
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--batches", default="1,8,max")
    args = ap.parse_args()
    if "cuda" not in mp.devices:
        sys.exit(f"this mempipe build runs {mp.devices} only: build it with MEMPIPE_GPU=cuda")
    timer = Timer()
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth(timer)
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20}"
          f" MiB; copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)
    results = []

    def write():  # after every case, so a run cut short keeps what it measured
        doc = {
            "device": props.name, "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "dtype": "bf16", "page": PAGE, "budget_tokens": BUDGET},
            "copy_bw_Bps": copy_bw, "timing": "median of CUDA-event runs, L2 flushed before each",
            "path": "mempipe._mempipe (pybind11 module) on CUDA tensors",
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)

    for context in [int(c) for c in args.contexts.split(",")]:
        free, _ = torch.cuda.mem_get_info()
        cap = max_batch(context, free)
        batches = []
        for b in args.batches.split(","):
            b = cap if b == "max" else int(b)
            if b <= cap and b not in batches:
                batches.append(b)
        for b in batches:
            try:
                run_case(timer, copy_bw, context, b, results)
            except torch.cuda.OutOfMemoryError as e:
                print(f"{context} x {b}: out of memory ({e}); skipped", flush=True)
                torch.cuda.empty_cache()
            except (AssertionError, RuntimeError) as e:
                print(f"{context} x {b}: FAILED: {e}", flush=True)
                results.append({"context": context, "batch": b, "error": str(e)})
                torch.cuda.empty_cache()
            write()
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
