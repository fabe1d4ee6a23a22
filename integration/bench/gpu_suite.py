#!/usr/bin/env python3
"""mempipe GPU benchmark: our kernels beside PyTorch, side by side in one process.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16, page 16,
budget 4096 tokens, one decode query per sequence. For each (context, batch):
  dense   mempipe paged decode            vs torch SDPA over the same K/V (dense decode)
  select  mempipe fused score + top-k     vs plain torch Quest (bound, group max, topk)
  sparse  mempipe select + sparse decode  (the whole sparse step)
and the device-to-device copy bandwidth measured in the same run. Every timing is the
median over runs with L2 flushed before each (a decode layer's KV is never L2-resident),
CUDA events around the op alone, after warm-up. Bandwidth is on the bytes the op must move.

  python3 gpu_suite.py --lib build/integration/bench/libmempipe_gpu_capi.so --out results.json
"""
import argparse
import ctypes
import datetime
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, BUDGET = 32, 8, 128, 16, 4096
GROUP = Q_HEADS // KV_HEADS
BF16 = 2  # mempipe DType value


def load_lib(path):
    lib = ctypes.CDLL(path)
    vp, i32, f32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
    lib.mempipe_gpu_last_error.restype = ctypes.c_char_p
    lib.mempipe_decode_workspace_bytes.restype = sz
    lib.mempipe_decode_workspace_bytes.argtypes = [i32] * 4
    lib.mempipe_select_workspace_bytes.restype = sz
    lib.mempipe_select_workspace_bytes.argtypes = [i32] * 3
    lib.mempipe_paged_decode.argtypes = [vp] * 7 + [i32] * 9 + [f32, vp, sz, vp]
    lib.mempipe_score_and_select.argtypes = [vp] * 4 + [i32] * 12 + [vp, vp, i32, vp, sz, vp]
    lib.mempipe_compute_relevancy.argtypes = [vp] * 4 + [i32] * 9 + [vp, vp]
    lib.mempipe_build_digests.argtypes = [vp] * 4 + [i32] * 7 + [vp]
    return lib


def check(lib, rc, what):
    if rc != 0:
        raise RuntimeError(f"{what}: {lib.mempipe_gpu_last_error().decode()}")


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
        times = []
        total = 0.0
        while len(times) < max_runs and (len(times) < min_runs or total < budget_s * 1e3):
            self.flush.fill_(len(times) & 0xFF)
            s.record()
            fn()
            e.record()
            e.synchronize()
            t = s.elapsed_time(e)
            times.append(t)
            total += t
        return statistics.median(times), len(times)


def copy_bandwidth(timer):
    n = 2 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = timer(lambda: dst.copy_(src), budget_s=1.0)
    del src, dst
    return 2 * n / (ms * 1e-3)  # read + write


def max_batch(context, free_bytes):
    per_seq = context * KV_HEADS * HEAD_DIM * 2 * 2 * (1 + 1 / PAGE) + 4096
    return max(1, int(0.80 * free_bytes // per_seq))


def run_case(lib, timer, copy_bw, context, batch, results):
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
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    p = lambda t: ctypes.c_void_p(t.data_ptr())

    check(lib, lib.mempipe_build_digests(p(kv), p(digests), p(table), p(lens), BF16, batch,
                                         KV_HEADS, HEAD_DIM, num_blocks, PAGE, pages, stream),
          "build digests")
    ws_bytes = lib.mempipe_decode_workspace_bytes(batch, Q_HEADS, KV_HEADS, pages)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=dev)
    k_sel = BUDGET // PAGE
    sel = torch.full((batch, KV_HEADS, k_sel), -1, dtype=torch.int32, device=dev)
    cnt = torch.zeros(batch, KV_HEADS, dtype=torch.int32, device=dev)
    sws_bytes = lib.mempipe_select_workspace_bytes(batch, KV_HEADS, pages)
    sws = torch.empty(max(sws_bytes, 16), dtype=torch.uint8, device=dev)
    sparse_ws_bytes = lib.mempipe_decode_workspace_bytes(batch, Q_HEADS, KV_HEADS, k_sel)
    sparse_ws = torch.empty(max(sparse_ws_bytes, 16), dtype=torch.uint8, device=dev)
    sparse_out = torch.full_like(q, float("nan"))

    def dense():
        check(lib, lib.mempipe_paged_decode(p(q), p(out), p(kv), p(table), p(lens), None, None,
                                            BF16, batch, Q_HEADS, KV_HEADS, HEAD_DIM,
                                            num_blocks, PAGE, pages, 0, scale, p(ws), ws_bytes,
                                            stream), "dense decode")

    def select():
        check(lib, lib.mempipe_score_and_select(p(q), p(digests), p(table), p(lens), BF16,
                                                batch, Q_HEADS, KV_HEADS, HEAD_DIM, num_blocks,
                                                PAGE, pages, BUDGET, 1, 1, 0, p(sel), p(cnt),
                                                k_sel, p(sws), sws_bytes, stream), "select")

    def score_only():
        check(lib, lib.mempipe_compute_relevancy(p(q), p(digests), p(table), p(lens), BF16,
                                                 batch, Q_HEADS, KV_HEADS, HEAD_DIM, num_blocks,
                                                 PAGE, pages, 0, p(sws), stream), "relevancy")

    def sparse_attn():
        check(lib, lib.mempipe_paged_decode(p(q), p(sparse_out), p(kv), p(table), p(lens),
                                            p(sel), p(cnt), BF16, batch, Q_HEADS, KV_HEADS,
                                            HEAD_DIM, num_blocks, PAGE, pages, k_sel, scale,
                                            p(sparse_ws), sparse_ws_bytes, stream),
              "sparse decode")

    def sparse_step():
        select()
        sparse_attn()

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

    # Correctness on this data before timing: dense vs SDPA; the selection well-formed; the
    # sparse output of sequence 0 vs torch attention over exactly the selected tokens.
    dense()
    select()
    sparse_attn()
    ref = sdpa().view(batch, Q_HEADS, HEAD_DIM).float()
    dense_err = (out.float() - ref).abs().max().item()
    assert dense_err < 2e-2, f"dense decode differs from SDPA by {dense_err}"
    assert bool(torch.all(cnt == min(k_sel, pages))), "selection counts"
    srt = sel.sort(dim=-1).values
    assert bool(torch.all(sel == srt)) and int(sel.min()) >= 0, "selection not ascending/valid"
    sparse_err = 0.0
    for h in range(KV_HEADS):
        tok = (sel[0, h].long()[:, None] * PAGE + torch.arange(PAGE, device=dev)).flatten()
        kk, vv = k_view[0, h, tok].float(), v_view[0, h, tok].float()
        qq = q[0, h * GROUP:(h + 1) * GROUP].float()
        ref_s = torch.softmax(qq @ kk.T * scale, dim=-1) @ vv
        sparse_err = max(sparse_err, (sparse_out[0, h * GROUP:(h + 1) * GROUP].float() - ref_s)
                         .abs().max().item())
    assert sparse_err < 2e-2, f"sparse decode differs from torch by {sparse_err}"

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
    ]:
        try:
            ms, runs = timer(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows[name] = None
            continue
        bw = nbytes / (ms * 1e-3)
        rows[name] = {"ms": ms, "runs": runs, "bytes": nbytes, "GBps": bw / 1e9,
                      "frac_copy_bw": bw / copy_bw,
                      "floor_ms": nbytes / copy_bw * 1e3}
    rows["dense_max_abs_err_vs_sdpa"] = dense_err
    rows["sparse_max_abs_err_vs_torch"] = sparse_err
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
          f"{rows['speedup_sparse_step_vs_sdpa']:.1f}x vs sdpa)", flush=True)
    del kv, digests, ws, sws, sparse_ws
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--batches", default="1,8,max")
    args = ap.parse_args()
    lib = load_lib(args.lib)
    timer = Timer()
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth(timer)
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20}"
          f" MiB; copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)
    results = []
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
                run_case(lib, timer, copy_bw, context, b, results)
            except torch.cuda.OutOfMemoryError as e:
                print(f"{context} x {b}: out of memory ({e}); skipped", flush=True)
                torch.cuda.empty_cache()
            except (AssertionError, RuntimeError) as e:
                print(f"{context} x {b}: FAILED: {e}", flush=True)
                results.append({"context": context, "batch": b, "error": str(e)})
                torch.cuda.empty_cache()
    doc = {
        "device": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "dtype": "bf16", "page": PAGE, "budget_tokens": BUDGET},
        "copy_bw_Bps": copy_bw, "timing": "median of CUDA-event runs, L2 flushed before each",
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
