#!/usr/bin/env python3
"""Per-call time of mempipe's host kernels (decode, and the selection: relevancy + top-k) inside a
torch process, right after a torch operator, by where their split over threads runs (issue 16):

  1 thread         num_threads=1 (the caller only)
  N pool           num_threads=N on mempipe's own thread pool (core/thread_pool.h)
  N torch team     num_threads=N on torch's OpenMP team (mempipe.host_threads.use_torch_openmp)

Each iteration runs the torch operator (a matmul of a decode step's MLP shape by default, which
leaves torch's OpenMP threads spinning), then times one `_mempipe.dense_decode`,
`_mempipe.sparse_decode` or `_mempipe.score_and_select` call ("select"; the serving path ran it
on one thread before it took num_threads), and the operator + call pair. The modes are
interleaved in rounds so that a change of the machine's load hits all of them alike. Progress:
one line per round.

    python integration/bench/host_threads_bench.py --seq-len 6144 --batch 4 --threads 2

Shapes default to SmolLM2-135M (9 query heads, 3 KV heads, head size 64), block size 32,
budget 512 tokens (16 pages per KV head, chosen at random) for sparse_decode and the budget
score_and_select chooses to; random data.
Needs torch and the mempipe package (or PYTHONPATH at a folder holding mempipe/ with its
_mempipe module).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="sequences per call")
    ap.add_argument("--seq-len", type=int, default=6144, help="tokens per sequence")
    ap.add_argument("--heads", type=int, default=9, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads")
    ap.add_argument("--head-dim", type=int, default=64, help="head size")
    ap.add_argument("--block-size", type=int, default=32, help="tokens per page")
    ap.add_argument("--budget", type=int, default=512, help="sparse_decode tokens per KV head")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="cache dtype")
    ap.add_argument("--threads", type=int, default=2, help="N of the N-thread modes")
    ap.add_argument("--op", default="4,576,1536",
                    help="the torch matmul before each call, M,K,N ('none': no operator)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per mode per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (modes interleaved)")
    ap.add_argument("--kernels", default="select,sparse,dense",
                    help="comma-separated: select (score_and_select), sparse, dense")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    import torch

    from mempipe import _mempipe, host_threads
    if args.threads < 2:
        raise SystemExit(f"--threads must be at least 2, got {args.threads}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    bs, kvh, d, S = args.block_size, args.kv_heads, args.head_dim, args.batch
    pages_per_seq = -(-args.seq_len // bs)
    num_blocks = S * pages_per_seq
    kv = torch.randn(2, num_blocks, bs, kvh, d, generator=gen).to(dtype)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(S, pages_per_seq)
    seq_lens = torch.full((S,), args.seq_len, dtype=torch.int32)
    q = torch.randn(S, args.heads, d, generator=gen).to(dtype)
    out = torch.empty_like(q)
    budget_pages = min(pages_per_seq, max(1, args.budget // bs))
    pages = torch.stack([torch.stack([torch.randperm(pages_per_seq, generator=gen)[:budget_pages]
                                      .sort().values for _ in range(kvh)]) for _ in range(S)])
    pages = pages.to(torch.int32).contiguous()
    counts = torch.full((S, kvh), budget_pages, dtype=torch.int32)
    scale = d ** -0.5
    digests = torch.empty(num_blocks, 2, kvh, d, dtype=dtype)
    _mempipe.build_digests(kv, block_table, seq_lens, digests)
    sel_pages, sel_counts = torch.empty_like(pages), torch.empty_like(counts)
    if args.op == "none":
        def op():
            pass
    else:
        m, k, n = (int(x) for x in args.op.split(","))
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)

        def op():
            torch.mm(a, b)

    calls = {
        "select": lambda t: _mempipe.score_and_select(q, kv, digests, block_table, seq_lens,
                                                      sel_pages, sel_counts,
                                                      budget=budget_pages * bs, num_threads=t),
        "sparse": lambda t: _mempipe.sparse_decode(q, kv, block_table, seq_lens, pages, counts,
                                                   out, scale, num_threads=t),
        "dense": lambda t: _mempipe.dense_decode(q, kv, block_table, seq_lens, out, scale,
                                                 num_threads=t),
    }
    kernels = args.kernels.split(",")
    for name in kernels:
        if name not in calls:
            raise SystemExit(f"--kernels: unknown kernel {name!r} (select, sparse, dense)")
    library = host_threads.torch_openmp_library()
    n = args.threads
    modes = [("1 thread", None, 1), (f"{n} pool", None, n), (f"{n} torch team", library, n)]
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[setup] torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"OpenMP runtime {library}; {S} x {args.seq_len} tokens, {args.dtype}, op {args.op}; "
          f"{uptime0}", flush=True)
    call_us = {(k, m[0]): [] for k in kernels for m in modes}
    pair_us = {(k, m[0]): [] for k in kernels for m in modes}
    for rnd in range(args.rounds):
        for kernel in kernels:
            for label, lib, threads in modes:
                if lib is None:
                    host_threads.use_mempipe_pool()
                else:
                    _mempipe.set_host_parallel_runtime(lib)
                call = calls[kernel]
                for _ in range(3):  # warm-up after a switch
                    op()
                    call(threads)
                for _ in range(args.iters):
                    t0 = time.perf_counter_ns()
                    op()
                    t1 = time.perf_counter_ns()
                    call(threads)
                    t2 = time.perf_counter_ns()
                    call_us[kernel, label].append((t2 - t1) / 1e3)
                    pair_us[kernel, label].append((t2 - t0) / 1e3)
        team = host_threads.info()
        print(f"[round {rnd + 1}/{args.rounds}] team calls {team['team_calls']}, threads in the "
              f"latest team call {team['last_call_threads']}", flush=True)
    host_threads.use_mempipe_pool()
    uptime1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[done] {uptime1}")
    rows = []
    print(f"\n| kernel | mode | call median us | call mean us | call p90 us | op + call median us |")
    print("|---|---|---|---|---|---|")
    for (kernel, label), xs in call_us.items():
        ys = pair_us[kernel, label]
        p90 = statistics.quantiles(xs, n=10)[-1]
        row = dict(kernel=kernel, mode=label, call_median_us=statistics.median(xs),
                   call_mean_us=statistics.fmean(xs), call_p90_us=p90,
                   pair_median_us=statistics.median(ys), samples=len(xs))
        rows.append(row)
        print(f"| {kernel} | {label} | {row['call_median_us']:.0f} | {row['call_mean_us']:.0f} | "
              f"{p90:.0f} | {row['pair_median_us']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), uptime_start=uptime0, uptime_end=uptime1,
                           library=library, torch_threads=torch.get_num_threads(), rows=rows),
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
