#!/usr/bin/env python3
"""torch's CPU scaled_dot_product_attention on mempipe-bench's decode shape, side by side.

Reads the shape, thread count and measured memory bandwidth from a mempipe-bench JSON file and
times one decode token per sequence through every layer with
torch.nn.functional.scaled_dot_product_attention over a contiguous [batch, kv_heads, context,
head_dim] cache (what a user would otherwise run on the CPU). Two ways to call it for GQA
(--variants):
  grouped     the G query heads of a KV head as G query rows: q.view(batch, kv_heads, G, dim)
              against k, v [batch, kv_heads, context, dim] (no mask); the faster one
  enable_gqa  q [batch, heads, 1, dim] with enable_gqa=True; torch 2.13 expands K/V per query
              head on the CPU, about 7x slower on the build VM (too slow for .ci/bench's minute)
Reports the same columns as mempipe-bench's apply line: ms per step, K/V GB/s (wall and
per-thread CPU time) and the fraction of the bandwidth mempipe-bench measured in the same run.

  python integration/bench/torch_cpu_sdpa.py --bench-json bench.json [--json torch.json]

Memory: the layers cycle over --distinct-layers cache buffers (default 2): each is far larger
than the last-level cache, so every layer still reads its bytes from DRAM, and the run needs
only distinct_layers x the per-layer cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-json", required=True, help="mempipe-bench --json output (shape, threads, bandwidth)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (0: the bench's --steps)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--distinct-layers", type=int, default=2, help="cache buffers the layers cycle over (>= 1)")
    ap.add_argument("--variants", default="grouped", help="comma-separated: grouped, enable_gqa")
    ap.add_argument("--json", default="", help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in ("grouped", "enable_gqa")]
    if bad or not variants:
        ap.error(f"--variants must list grouped and/or enable_gqa, got {args.variants!r}")
    if args.distinct_layers < 1 or args.steps < 0 or args.warmup < 0:
        ap.error(f"--distinct-layers must be >= 1 and --steps/--warmup >= 0, got "
                 f"{args.distinct_layers}, {args.steps}, {args.warmup}")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:  # torch is optional for the C++ bench
        print(f"torch CPU SDPA: skipped ({e})")
        return 0

    with open(args.bench_json) as f:
        bench = json.load(f)
    c = bench["config"]
    threads = int(bench["machine"].get("threads_used", bench["machine"]["hardware_threads"]))
    if c["dtype"] not in DTYPES:
        raise ValueError(f"dtype {c['dtype']!r} in {args.bench_json} is not one of {sorted(DTYPES)}")
    dtype = getattr(torch, DTYPES[c["dtype"]])
    layers, batch, ctx = c["layers"], c["batch"], c["context"]
    heads, kv_heads, dim = c["num_heads"], c["num_kv_heads"], c["head_dim"]
    steps = args.steps or c["steps"]
    torch.set_num_threads(threads)
    torch.manual_seed(c.get("seed", 1))

    distinct = min(args.distinct_layers, layers)
    shape = (batch, kv_heads, ctx, dim)
    print(f"torch {torch.__version__} CPU SDPA: {layers} layers, batch {batch} x context {ctx}, "
          f"{heads}/{kv_heads} heads, head_dim {dim}, {c['dtype']}, {threads} threads "
          f"({distinct} distinct layer caches)", flush=True)
    caches = []
    for i in range(distinct):
        caches.append((torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)))
        print(f"\r[torch fill] {i + 1}/{distinct} layer caches", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    q = torch.randn((batch, heads, 1, dim), dtype=dtype)
    q_grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
    kv_bytes = 2.0 * batch * kv_heads * ctx * dim * caches[0][0].element_size() * layers
    machine = bench["machine"]
    bw, bw_cpu = machine.get("read_bandwidth_gbps"), machine.get("read_bandwidth_gbps_cpu_time")
    dense = next((p for p in bench.get("placements", []) if p["placement"] == "dense"), None)
    results = []
    for variant in variants:
        wall, cpu = [], []
        with torch.inference_mode():
            for step in range(args.warmup + steps):
                w0, c0 = time.perf_counter(), time.process_time()
                for layer in range(layers):
                    k, v = caches[layer % distinct]
                    if variant == "grouped":
                        F.scaled_dot_product_attention(q_grouped, k, v)
                    else:
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                w, cp = time.perf_counter() - w0, time.process_time() - c0
                warm = step < args.warmup
                print(f"[torch sdpa {variant}] step {step + 1}/{args.warmup + steps}  {w * 1e3:.1f} ms"
                      f"{' (warm-up)' if warm else ''}", file=sys.stderr, flush=True)
                if not warm:
                    wall.append(w)
                    cpu.append(cp)
        wall_s = sorted(wall)[len(wall) // 2]
        cpu_s = sorted(cpu)[len(cpu) // 2] / threads
        gbps, cpu_gbps = kv_bytes / wall_s / 1e9, kv_bytes / cpu_s / 1e9
        line = (f"  torch  SDPA ({variant}, dense, contiguous cache) reads {kv_bytes / 2**20:.1f} MiB "
                f"of K/V: wall {wall_s * 1e3:.1f} ms = {gbps:.1f} GB/s")
        if bw:
            line += f" = {100 * gbps / bw:.0f}% of {bw:.1f}"
        line += f"; CPU {cpu_s * 1e3:.1f} ms per thread = {cpu_gbps:.1f} GB/s"
        if bw_cpu:
            line += f" = {100 * cpu_gbps / bw_cpu:.0f}% of {bw_cpu:.1f}"
        print(line, flush=True)
        r = {"variant": variant, "median_step_ms": wall_s * 1e3, "step_ms": [w * 1e3 for w in wall],
             "cpu_ms_per_thread": cpu_s * 1e3, "gbytes_per_s": gbps, "gbytes_per_s_cpu_time": cpu_gbps,
             "bandwidth_fraction": gbps / bw if bw else None,
             "bandwidth_fraction_cpu_time": cpu_gbps / bw_cpu if bw_cpu else None}
        if dense:
            r["mempipe_dense_speedup"] = wall_s * 1e3 / dense["apply_ms"]
            r["mempipe_dense_speedup_cpu_time"] = cpu_s * 1e3 / (dense["apply_cpu_ms"] / threads)
            print(f"  mempipe dense apply is {r['mempipe_dense_speedup']:.2f}x faster than torch SDPA "
                  f"({variant}) in wall time, {r['mempipe_dense_speedup_cpu_time']:.2f}x in CPU time")
        results.append(r)
    if args.json:
        out = {"torch": torch.__version__, "threads": threads, "kv_bytes_per_step": kv_bytes,
               "distinct_layer_caches": distinct, "bench_json": args.bench_json, "variants": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
