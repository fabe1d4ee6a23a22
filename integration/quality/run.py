"""Quality of mempipe's sparse decoding on a trained model (SmolLM2-135M-Instruct), offline.

    build/python-venv/bin/python integration/quality/run.py                 # default grid
    build/python-venv/bin/python integration/quality/run.py --grid smoke    # a minute or two
    build/python-venv/bin/python integration/quality/run.py --grid full --out /tmp/q  # hours

For each task case the prompt (all but its last token) is prefilled densely once (SDPA); then
every configuration decodes from that cache through the one-token decode path: the prompt's last
token, then greedy tokens until the answer is produced or can no longer be (`tasks.answer_state`).
Perplexity: windows of the Python reference's prose, prefilled densely up to --ppl-context
tokens, then --ppl-steps tokens teacher-forced through the decode path; per step the
configuration's next-token distribution is compared with dense's (KL(dense || config), top-1
agreement) and its NLL gives the PPL ratio.

Writes OUT/results.json (every case and every configuration; rewritten after each case, so an
interrupted run keeps what it finished), then OUT/results.md and the plots (report.py).
Configurations (`--grid`):
    default  dense; mempipe page 16, max, dense_layers 2 at every --budgets; page sizes 32/64,
             aggregation sum, dense_layers 0/1 at the --axis-budgets; per-query-head selection
             (Quest-style, equal bytes) at the --per-head-budgets
    full     every combination of --budgets x --page-sizes x --aggregations x --dense-layers,
             plus per-query-head selection for each budget x page size x dense_layers
    smoke    dense, mempipe and per-head at 256 (for checking the harness)
    study    the committed study's grid (`study_selections`): 21 configurations
--configs adds configurations to any grid (e.g. the overlap schemes' and int8 digests' keys).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import platform
import shlex
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("default", "full", "smoke", "study"), default="default",
                   help="which configurations to run (see above); default: %(default)s")
    p.add_argument("--budgets", type=ints, default=[64, 128, 256, 512, 1024],
                   help="tokens kept per KV head, comma-separated; default: 64,128,256,512,1024")
    p.add_argument("--axis-budgets", type=ints, default=[256],
                   help="budgets at which the default grid varies page size, aggregation and "
                        "dense_layers; default: 256")
    p.add_argument("--per-head-budgets", type=ints, default=[128, 256, 512, 1024],
                   help="GQA budgets at which the default grid runs the per-query-head "
                        "baseline; default: 128,256,512,1024 (at 64 = 4 pages of 16 it would "
                        "keep only the sink and local pages)")
    p.add_argument("--page-sizes", type=ints, default=[16, 32, 64],
                   help="page sizes (16, 32, 64); default: 16,32,64 (the first is the base)")
    p.add_argument("--aggregations", default="max,sum",
                   help="GQA aggregations; default: max,sum (the first is the base)")
    p.add_argument("--dense-layers", type=ints, default=[2, 0, 1],
                   help="numbers of leading dense layers; default: 2,0,1 (the first is the base)")
    p.add_argument("--no-per-head", action="store_true",
                   help="skip the per-query-head (Quest-style) baseline")
    p.add_argument("--tasks", default="passkey,needle,multikey",
                   help="task families; default: passkey,needle,multikey")
    p.add_argument("--lengths", type=ints, default=[8000],
                   help="prompt lengths in tokens (window 8192); default: 8000")
    p.add_argument("--depths", type=floats, default=[0.25, 0.75],
                   help="needle depths (fraction of the haystack); default: 0.25,0.75")
    p.add_argument("--per-point", type=int, default=1,
                   help="cases per (task, length, depth); default: 1")
    p.add_argument("--multikey", type=int, default=4,
                   help="facts per multi-key prompt; default: 4")
    p.add_argument("--multikey-cases", type=int, default=1,
                   help="multi-key prompts per length; default: 1")
    p.add_argument("--ppl-context", type=int, default=7936,
                   help="tokens of prose before the scored ones (0: no perplexity); "
                        "default: 7936")
    p.add_argument("--ppl-steps", type=int, default=32,
                   help="tokens scored per perplexity window; default: 32")
    p.add_argument("--ppl-windows", type=int, default=1,
                   help="perplexity windows (disjoint stretches of text); default: 1")
    p.add_argument("--max-new", type=int, default=8,
                   help="most tokens generated per task case; default: 8")
    p.add_argument("--seed", default="0",
                   help="case generation seed, or 'random' for a fresh one (printed and stored "
                        "in results.json); default: 0")
    p.add_argument("--configs", default="",
                   help="extra configurations, ';'-separated, each kind:budget:page:dense_layers"
                        ":aggregation[:sinks:locals[:k=v,...]] (e.g. "
                        "'mempipe:512:16:2:max:4:4;mempipe:1024:16:2:max:1:1:reuse=4'); "
                        "per_head's budget may be B=hN: labelled with the GQA budget B, "
                        "N tokens per query head (a bytes-matched baseline)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda (mempipe's gpu placement: a GPU build); default: cpu")
    p.add_argument("--selections-out", default="",
                   help="also write every sparse layer's selection per step (first "
                        "--selections-cases task cases) to this .pt file")
    p.add_argument("--selections-cases", type=int, default=1,
                   help="task cases whose selections --selections-out keeps; default: 1")
    p.add_argument("--threads", type=int, default=2, help="torch threads; default: 2")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="output folder; default: integration/quality/results")
    p.add_argument("--no-report", action="store_true",
                   help="write results.json only (no Markdown table, no plots)")
    args = p.parse_args(argv)
    if args.seed == "random":
        import random
        args.seed = random.SystemRandom().randrange(1, 10**6)
    else:
        try:
            args.seed = int(args.seed)
        except ValueError:
            p.error(f"--seed: expected an integer or 'random', got {args.seed!r}")
    try:
        args.configs = [parse_config(c) for c in args.configs.split(";") if c.strip()]
    except ValueError as e:
        p.error(f"--configs: {e}")
    args.aggregations = [a for a in args.aggregations.split(",") if a]
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in args.tasks if t not in ("passkey", "needle", "multikey")]
    if bad:
        p.error(f"unknown task(s) {bad}; known: passkey, needle, multikey")
    for length in args.lengths:
        if not 256 <= length <= 8192 - args.max_new:
            p.error(f"--lengths: {length} must be in [256, {8192 - args.max_new}] "
                    "(the model's window is 8192 tokens)")
    if args.ppl_context and args.ppl_context + args.ppl_steps > 8192:
        p.error(f"--ppl-context {args.ppl_context} + --ppl-steps {args.ppl_steps} exceeds the "
                "8192-token window")
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            p.error(f"--depths: {d} is not a fraction in [0, 1]")
    return args


def parse_config(text: str):
    """kind:budget:page:dense_layers:aggregation[:sinks:locals[:k=v,...]] -> Selection."""
    from smollm import Selection, SINKS, LOCALS
    parts = text.strip().split(":")
    if len(parts) not in (5, 7, 8) or parts[0] not in ("mempipe", "per_head"):
        raise ValueError(f"{text!r} is not kind:budget:page:dense_layers:aggregation"
                         "[:sinks:locals[:k=v,...]] with kind mempipe or per_head")
    budget, _, head = parts[1].partition("=h")
    if head and parts[0] != "per_head":
        raise ValueError(f"{text!r}: a per-query-head budget (B=hN) is for kind per_head")
    try:
        nums = [int(x) for x in [budget] + parts[2:4]] + [int(x) for x in parts[5:7]]
        head_budget = int(head) if head else 0
    except ValueError:
        raise ValueError(f"{text!r}: budget, page, dense_layers, sinks, locals must be "
                         "integers") from None
    sinks, locals_ = (nums[3], nums[4]) if len(parts) >= 7 else (SINKS, LOCALS)
    return Selection(parts[0], nums[0], nums[1], nums[2], parts[4], sinks, locals_,
                     parts[7] if len(parts) == 8 else "", head_budget)


def study_selections():
    """The grid of the committed study (`--grid study`): the budget sweep at page 16 / max /
    2 dense layers, page 32 and 64, sum, dense_layers 0 and 1, more sink/local pages, and the
    per-query-head baseline at equal bytes."""
    from smollm import Selection
    out = [Selection.dense()]
    out += [Selection("mempipe", b, 16) for b in (64, 128, 256, 512, 1024)]
    out += [Selection("mempipe", b, 32) for b in (256, 512, 1024)]
    out += [Selection("mempipe", b, 64) for b in (512, 1024)]
    out += [Selection("mempipe", b, 16, aggregation="sum") for b in (256, 512, 1024)]
    out += [Selection("mempipe", 512, 16, dense_layers=dl) for dl in (0, 1)]
    out += [Selection("mempipe", b, 16, sinks=4, locals=4) for b in (512, 1024)]
    out += [Selection("per_head", b, 16) for b in (256, 512, 1024)]
    return out


def selections(args):
    from smollm import Selection
    base_p, base_a, base_dl = args.page_sizes[0], args.aggregations[0], args.dense_layers[0]
    if args.grid == "study":
        out = study_selections()
        return out + [c for c in args.configs if c not in out]
    out = [Selection.dense()]
    if args.grid == "smoke":
        out += [Selection("mempipe", 256, base_p, base_dl, base_a)]
        if not args.no_per_head:
            out.append(Selection("per_head", 256, base_p, base_dl))
        return out + [c for c in args.configs if c not in out]
    if args.grid == "full":
        for b, p, a, dl in itertools.product(args.budgets, args.page_sizes, args.aggregations,
                                             args.dense_layers):
            if b % p == 0 and b // p >= 2:
                out.append(Selection("mempipe", b, p, dl, a))
        if not args.no_per_head:
            for b, p, dl in itertools.product(args.budgets, args.page_sizes, args.dense_layers):
                if b % p == 0 and b // p >= 2:
                    out.append(Selection("per_head", b, p, dl))
        return out + [c for c in args.configs if c not in out]
    seen = set(out)
    add = lambda s: (s not in seen) and (seen.add(s) or out.append(s))  # noqa: E731
    for b in args.budgets:
        add(Selection("mempipe", b, base_p, base_dl, base_a))
    for b in args.axis_budgets:
        for p in args.page_sizes[1:]:
            if b % p == 0 and b // p >= 2:
                add(Selection("mempipe", b, p, base_dl, base_a))
        for a in args.aggregations[1:]:
            add(Selection("mempipe", b, base_p, base_dl, a))
        for dl in args.dense_layers[1:]:
            add(Selection("mempipe", b, base_p, dl, base_a))
    if not args.no_per_head:
        for b in args.per_head_budgets:
            add(Selection("per_head", b, base_p, base_dl))
    for c in args.configs:
        add(c)
    return out


def build_cases(args, tok):
    cases = []
    if "passkey" in args.tasks:
        cases += tasks.passkey_cases(tok, args.lengths, args.depths, args.per_point, args.seed)
    if "needle" in args.tasks:
        cases += tasks.needle_cases(tok, args.lengths, args.depths, args.per_point, args.seed)
    if "multikey" in args.tasks:
        cases += tasks.multikey_cases(tok, args.lengths, args.multikey_cases, args.multikey,
                                      args.seed)
    # Round-robin over (task, length, depth): a run stopped early keeps a balanced subset.
    return sorted(cases, key=lambda c: c.index)


def kl_top1(ref_lp, lp):
    import torch
    kl = float((torch.exp(ref_lp) * (ref_lp - lp)).sum())
    return max(kl, 0.0), bool(int(ref_lp.argmax()) == int(lp.argmax()))


def machine() -> str:
    """The CPU (brand, x86 family and model, logical CPUs: mempipe's cpu_description) and OS."""
    from mempipe import _mempipe
    return f"{_mempipe.cpu_description()}, {platform.system()} {platform.release()}"


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def tick(self, what: str, units: int = 1):
        self.done += units
        el = time.perf_counter() - self.start
        eta = el / self.done * (self.total - self.done) if self.done else 0
        print(f"[quality {self.done}/{self.total} {el / 60:5.1f} min, ~{eta / 60:4.1f} min left] "
              f"{what}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    import smollm
    t_start = time.perf_counter()
    print(f"[seed] quality run.py --seed {args.seed}", flush=True)
    print(f"[quality] loading the model from {smollm.gguf_path()}", flush=True)
    model, tok = smollm.load_model()
    model = model.to(args.device)
    dec = smollm.Decoder(model, keep_selections=bool(args.selections_out))
    dumped = []
    sels = selections(args)
    cases = build_cases(args, tok)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[quality] {len(cases)} task cases x {len(sels)} configurations; perplexity "
          f"{args.ppl_windows} window(s) of {args.ppl_context} + {args.ppl_steps} tokens",
          flush=True)
    result = {
        "model": f"SmolLM2-135M-Instruct ({smollm.GGUF_FILE} from the '{smollm.GGUF_PACKAGE}' "
                 f"package, dequantized to float32)",
        "command": "build/python-venv/bin/python integration/quality/run.py " + shlex.join(
            list(sys.argv[1:] if argv is None else argv)),
        "machine": machine(), "torch_threads": args.threads, "seed": args.seed,
        "device": (torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
                   else "cpu"),
        "decode_path": "mempipe.hf.MempipeCache (placement " + dec.placement + ")",
        "element_bytes": dec.elem,
        "configurations": [s.name for s in sels],
        "selections": {s.name: {"kind": s.kind, "budget": s.budget, "head_budget": s.head_budget,
                                "page_size": s.page_size,
                                "dense_layers": s.dense_layers, "aggregation": s.aggregation,
                                "sinks": s.sinks, "locals": s.locals, "extra": s.extra,
                                "mempipe_config": s.config_string(dec.group, dec.placement)
                                if s.kind != "dense" else ""} for s in sels},
        "cases": [], "ppl": [], "wall_seconds": None,
    }
    ppl_units = args.ppl_windows * len(sels) if args.ppl_context else 0
    prog = Progress(len(cases) * len(sels) + ppl_units)

    def save():
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")

    for case in cases:
        ids = case.prompt_ids
        t0 = time.perf_counter()
        cache = dec.prefill(ids[:-1])
        prefill_s = time.perf_counter() - t0
        entry = {"name": case.name, "task": case.task, "length": len(ids), "depth": case.depth,
                 "answer": case.answer, "prefill_seconds": round(prefill_s, 2), "runs": {}}
        ref_first = None
        for sel in sels:
            stop = lambda g: tasks.answer_state(tok.decode(g), case.answer) != "open"  # noqa
            run = dec.greedy(cache, len(ids) - 1, ids[-1], sel, args.max_new, stop)
            text = tok.decode(run.tokens)
            if sel.kind == "dense":
                ref_first = run.logprobs[0]
            kl, top1 = kl_top1(ref_first, run.logprobs[0])
            if args.selections_out and len(result["cases"]) < args.selections_cases:
                dumped.append({"case": case.name, "config": sel.name, "tokens": run.tokens,
                               "selections": run.selections})
            entry["runs"][sel.name] = {
                "hit": tasks.answer_state(text, case.answer) == "hit", "text": text,
                "tokens": run.tokens,
                "first_kl": kl, "first_top1": top1,
                "bytes_per_step": sum(run.bytes_per_step) / len(run.bytes_per_step),
                "dense_bytes_per_step": sum(run.dense_bytes_per_step) / len(run.tokens),
                "seconds_per_step": run.seconds / len(run.tokens)}
            if run.recall is not None:
                entry["runs"][sel.name]["recall"] = run.recall
            prog.tick(f"{case.name} {sel.name}: {'hit ' if entry['runs'][sel.name]['hit'] else 'miss'}"
                      f" {text!r} (answer {case.answer}; {run.seconds / len(run.tokens):.2f} s/step"
                      f", prefill {prefill_s:.0f} s)")
        del cache
        result["cases"].append(entry)
        save()

    if args.ppl_context:
        text_ids = tok.encode(tasks.natural_text(), add_special_tokens=False)
        span = args.ppl_context + args.ppl_steps
        if len(text_ids) < span * args.ppl_windows:
            raise ValueError(f"the prose has {len(text_ids)} tokens, fewer than "
                             f"{args.ppl_windows} windows of {span}")
        for w in range(args.ppl_windows):
            window = text_ids[w * span:(w + 1) * span]
            prefix = args.ppl_context - 1
            t0 = time.perf_counter()
            cache = dec.prefill(window[:prefix])
            prefill_s = time.perf_counter() - t0
            targets = window[prefix + 1:]
            entry = {"window": w, "context": args.ppl_context, "steps": args.ppl_steps,
                     "prefill_seconds": round(prefill_s, 2), "runs": {}}
            result["ppl"].append(entry)  # saved after every configuration
            ref = None
            for sel in sels:
                run = dec.forced(cache, prefix, window[prefix:], sel)
                nll = [-float(lp[t]) for lp, t in zip(run.logprobs, targets)]
                if sel.kind == "dense":
                    ref = run.logprobs
                pairs = [kl_top1(a, b) for a, b in zip(ref, run.logprobs)]
                entry["runs"][sel.name] = {
                    "nll": sum(nll) / len(nll), "ppl": math.exp(sum(nll) / len(nll)),
                    "nll_tokens": [round(x, 6) for x in nll],
                    "kl_tokens": [round(k, 7) for k, _ in pairs],
                    "kl": sum(k for k, _ in pairs) / len(pairs),
                    "top1": sum(t for _, t in pairs) / len(pairs),
                    "bytes_per_step": sum(run.bytes_per_step) / len(run.bytes_per_step),
                    "dense_bytes_per_step":
                        sum(run.dense_bytes_per_step) / len(run.dense_bytes_per_step),
                    "seconds_per_step": run.seconds / len(run.tokens)}
                if run.recall is not None:
                    entry["runs"][sel.name]["recall"] = run.recall
                r = entry["runs"][sel.name]
                prog.tick(f"ppl window {w} {sel.name}: ppl {r['ppl']:.3f} kl {r['kl']:.4f} "
                          f"top1 {r['top1']:.3f} ({r['seconds_per_step']:.2f} s/step)")
                save()
            del cache
    save()
    if args.selections_out:
        torch.save(dumped, args.selections_out)
        print(f"[quality] wrote the selections of {len(dumped)} runs to {args.selections_out}",
              flush=True)
    print(f"[quality] wrote {out_dir / 'results.json'} in {result['wall_seconds'] / 60:.1f} min",
          flush=True)
    if not args.no_report:
        import report
        report.write(out_dir)


if __name__ == "__main__":
    main()
