#!/usr/bin/env python3
"""Cost of look-ahead's speculated query (lookahead_query=projected, issue 11), measured.

Per decoder layer and decode step, look-ahead with the projected query computes layer L+1's
query from the residual stream entering layer L: RMSNorm, one [hidden -> heads * head_dim]
GEMV (W_q of layer L+1) and RoPE (`mempipe.hf.speculated_query`). This times that call on a
transformers Llama decoder layer (random weights) of the given shape, next to the same layer's
own decode-step forward without attention (its RMSNorms, QKV, O and MLP projections: the
linear work the speculation adds to), at batch --batch, one token per sequence.

    build/python-venv/bin/python integration/bench/speculate_cost.py \
        [--shapes smollm2-135m,llama3-8b] [--batch 1] [--dtype fp32] [--iters 50] \
        [--threads 1] [--json out.json]

Flags:
  --shapes   comma list of smollm2-135m (hidden 576, 9 x 64 query heads, 3 KV heads, FFN
             1536), llama3-8b (4096, 32 x 128, 8 KV heads, FFN 14336); default both
  --batch    sequences decoded together (default 1)
  --dtype    fp32 | bf16 (default fp32)
  --iters    timed (speculation, layer) pairs, interleaved, after 5 warm-up pairs (default 50);
             medians of each and of the per-pair ratio (the measured share) are reported
  --threads  torch threads (default 1)
  --device   cpu | cuda (default cpu)
  --json     also write the figures to this file

Also printed: the **modeled** share for a weight-bandwidth-bound decode step, W_q's parameters
over the layer's (the speculation reads W_q of the next layer once more per step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {  # hidden, query heads, KV heads, head_dim, FFN
    "smollm2-135m": (576, 9, 3, 64, 1536),
    "llama3-8b": (4096, 32, 8, 128, 14336),
}


def _cpu() -> str:
    """The CPU: brand, x86 family and model, logical CPUs (mempipe's cpu_description)."""
    from mempipe import _mempipe
    return _mempipe.cpu_description()


def _time_pair(a, b, iters: int, sync) -> tuple[float, float, float]:
    """Median seconds of `a` and of `b`, and the median of the per-iteration ratio a/b, timed
    interleaved (a, b, a, b, ...) so that a loaded machine's slow spells hit both alike."""
    for _ in range(5):
        a(), b()
    sync()
    ta, tb, ratio = [], [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        a()
        sync()
        t1 = time.perf_counter()
        b()
        sync()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratio.append((t1 - t0) / (t2 - t1))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratio)


def measure(name: str, batch: int, dtype, iters: int, device) -> dict:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import mempipe.hf
    hidden, heads, kv_heads, head_dim, ffn = SHAPES[name]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=2)
    layer = LlamaDecoderLayer(cfg, layer_idx=1).to(device=device, dtype=dtype).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 1, hidden, generator=g).to(device=device, dtype=dtype)
    cos, sin = rope(x, torch.full((batch, 1), 1000, device=device))
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    attn = layer.self_attn

    def speculate():
        mempipe.hf.speculated_query(layer, x, cos, sin)

    def linear_work():  # the layer's own decode-step projections and MLP, without attention
        h = layer.input_layernorm(x)
        attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        y = x + attn.o_proj(torch.zeros(batch, 1, heads * head_dim, device=device,
                                        dtype=dtype))
        layer.mlp(layer.post_attention_layernorm(y))

    with torch.no_grad():
        t_spec, t_lin, share = _time_pair(speculate, linear_work, iters, sync)
    q_params = hidden * heads * head_dim
    layer_params = sum(p.numel() for p in layer.parameters())
    return {"shape": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "speculate_us": t_spec * 1e6, "layer_linear_us": t_lin * 1e6,
            "measured_share": share, "iters": iters,
            "modeled_share_weight_bound": q_params / layer_params,
            "q_params": q_params, "layer_params": layer_params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; one of {', '.join(SHAPES)}")
    if args.batch < 1 or args.iters < 1 or args.threads < 1:
        ap.error(f"--batch, --iters, --threads must be >= 1, got {args.batch}, {args.iters}, "
                 f"{args.threads}")
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    rows = []
    for s in shapes:
        print(f"[speculate_cost] {s} batch {args.batch} {args.dtype} on {device} ...",
              flush=True)
        r = measure(s, args.batch, dtype, args.iters, device)
        rows.append(r)
        print(f"[speculate_cost] {s}: speculated query {r['speculate_us']:.1f} us per layer "
              f"and step; the layer's own linear work {r['layer_linear_us']:.1f} us "
              f"(measured share, median of pairs {r['measured_share']:.1%}; modeled "
              f"weight-bound share "
              f"{r['modeled_share_weight_bound']:.1%})", flush=True)
    doc = {"command": "python3 integration/bench/speculate_cost.py " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "machine": f"{_cpu()}, torch {torch.__version__}, "
                      f"{args.threads} thread(s), device {device}"
                      + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                         else ""),
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
