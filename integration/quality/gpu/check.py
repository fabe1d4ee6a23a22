"""CPU vs GPU through the same harness: one passkey prompt, teacher-forced decode steps per
configuration through `mempipe.hf.MempipeCache` (placement cpu on host tensors, gpu on CUDA
tensors), every sparse layer's selection and the output distribution kept.

    python integration/quality/gpu/check.py --device cpu --out cpu.pt     # here
    python integration/quality/gpu/check.py --device cuda --out gpu.pt    # on the H200
    python integration/quality/gpu/check.py --compare cpu.pt gpu.pt       # -> Markdown + JSON

Both sides must load the same model file (MEMPIPE_SMOLLM_GGUF; gpu/pack.py). --compare reports,
per configuration, the share of (step, layer, head) selections that are the same page set on
both devices, the largest |log-prob| difference over each step's top-64 tokens, whether the
top-1 token agrees, and seconds per step on each device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIGS = ["dense", "mempipe:512:16:2:max", "mempipe:512:32:2:max", "mempipe:256:16:2:sum",
           "mempipe:2048:16:0:max", "per_head:512:16:2:max"]


def selection(spec: str):
    import run
    from smollm import Selection
    return Selection.dense() if spec == "dense" else run.parse_config(spec)


def collect(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as on the CPU
    import smollm
    import tasks
    t0 = time.perf_counter()
    model, tok = smollm.load_model()
    model = model.to(args.device)
    load_s = time.perf_counter() - t0
    dec = smollm.Decoder(model, keep_selections=True)
    case = tasks.passkey_cases(tok, [args.length], [0.5], 1, args.seed)[0]
    ids = case.prompt_ids
    forced = [ids[-1]] + tok.encode(f" {case.answer}. The pass key is {case.answer}.",
                                    add_special_tokens=False)
    t0 = time.perf_counter()
    cache = dec.prefill(ids[:-1])
    dec._sync()
    prefill_s = time.perf_counter() - t0
    out = {"device": (torch.cuda.get_device_name(model.device) if args.device == "cuda"
                      else "cpu"), "case": case.name, "seed": args.seed, "length": len(ids),
           "layers": dec.layers, "load_seconds": load_s, "prefill_seconds": prefill_s,
           "torch": torch.__version__, "runs": {}}
    for spec in args.configs:
        sel = selection(spec)
        dec.forced(cache, len(ids) - 1, forced[:2], sel)  # warm-up: fills the pages
        run = dec.forced(cache, len(ids) - 1, forced, sel)
        top = [lp.topk(64) for lp in run.logprobs]
        out["runs"][spec] = {
            "name": sel.name,
            "top_values": torch.stack([t.values for t in top]),
            "top_indices": torch.stack([t.indices for t in top]),
            "selections": run.selections,
            "seconds_per_step": run.seconds / len(run.tokens),
            "bytes_per_step": run.bytes_per_step}
        print(f"[check] {args.device} {sel.name}: {run.seconds / len(run.tokens) * 1e3:.1f} "
              f"ms/step over {len(run.tokens)} steps", flush=True)
    return out


def same_sets(ra: dict, rb: dict) -> tuple[int, int]:
    """(selections that are the same page set, selections compared) over steps x layers x
    heads."""
    same = total = 0
    for sa, sb in zip(ra["selections"], rb["selections"]):
        for (pa, ca), (pb, cb) in zip(sa, sb):
            for h in range(min(pa.shape[1], pb.shape[1])):
                x = set(pa[0, h, :int(ca[0, h])].tolist())
                y = set(pb[0, h, :int(cb[0, h])].tolist())
                same += x == y
                total += 1
    return same, total


# Negative control: two configurations that select differently must not compare as the same.
CONTROL = ("mempipe:512:16:2:max", "mempipe:256:16:2:sum")


def compare(a: dict, b: dict) -> tuple[str, dict]:
    rows = {}
    for spec, ra in a["runs"].items():
        rb = b["runs"].get(spec)
        if rb is None:
            continue
        same, total = same_sets(ra, rb)
        diff = 0.0
        top1 = 0
        for va, ia, vb, ib in zip(ra["top_values"], ra["top_indices"], rb["top_values"],
                                  rb["top_indices"]):
            mb = dict(zip(ib.tolist(), vb.tolist()))
            diff = max([diff] + [abs(v - mb[i]) for i, v in zip(ia.tolist(), va.tolist())
                                 if i in mb])
            top1 += int(ia[0]) == int(ib[0])
        rows[spec] = {"name": ra["name"], "selections_same": same, "selections_total": total,
                      "max_abs_logprob_diff_top64": diff, "top1_agree": top1,
                      "steps": len(ra["top_values"]),
                      "ms_per_step": [ra["seconds_per_step"] * 1e3, rb["seconds_per_step"] * 1e3]}
    lines = [f"# CPU ({a['device']}) vs GPU ({b['device']}): {a['case']}, {a['length']} tokens, "
             f"{a['layers']}-layer model", "",
             "| configuration | same page sets (step x layer x head) | max abs log-prob diff "
             "(top 64) | top-1 agrees | ms / step CPU | ms / step GPU |", "|---|---|---|---|---|---|"]
    for r in rows.values():
        sel = (f"{r['selections_same']}/{r['selections_total']}" if r["selections_total"]
               else "– (dense)")
        lines.append(f"| {r['name']} | {sel} | {r['max_abs_logprob_diff_top64']:.2e} | "
                     f"{r['top1_agree']}/{r['steps']} | {r['ms_per_step'][0]:.1f} | "
                     f"{r['ms_per_step'][1]:.1f} |")
    x, y = CONTROL
    if x in a["runs"] and y in b["runs"]:
        same, total = same_sets(a["runs"][x], b["runs"][y])
        rows["negative_control"] = {"cpu": x, "gpu": y, "selections_same": same,
                                    "selections_total": total}
        shifted = dict(b["runs"][x], selections=b["runs"][x]["selections"][1:])
        s2, t2 = same_sets(a["runs"][x], shifted)
        rows["negative_control_shifted"] = {"config": x, "selections_same": s2,
                                            "selections_total": t2}
        lines += ["", "Negative controls (the comparison can fail): CPU `" + x + "` against GPU `"
                  + y + f"`: {same}/{total} page sets equal; CPU `{x}` step t against GPU `{x}` "
                  f"step t+1 (same budget, one token later): {s2}/{t2} equal."]
    return "\n".join(lines) + "\n", rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda; default: cpu")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens; default: 2048")
    p.add_argument("--seed", type=int, default=12, help="prompt seed; default: 12")
    p.add_argument("--threads", type=int, default=2, help="torch threads; default: 2")
    p.add_argument("--configs", default=";".join(CONFIGS),
                   help="';'-separated run.py --configs specs (or dense); default: %(default)s")
    p.add_argument("--out", default="", help="write the collected runs to this .pt file")
    p.add_argument("--compare", nargs=2, metavar=("CPU_PT", "GPU_PT"),
                   help="compare two collected files instead; writes --md/--json")
    p.add_argument("--md", default="", help="--compare: Markdown output file")
    p.add_argument("--json", default="", help="--compare: JSON output file")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(";") if c]
    import torch
    if args.compare:
        a, b = (torch.load(f, weights_only=False) for f in args.compare)
        md, rows = compare(a, b)
        print(md)
        if args.md:
            pathlib.Path(args.md).write_text(md)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    print(f"[seed] gpu/check.py --seed {args.seed}", flush=True)
    out = collect(args)
    if args.out:
        torch.save(out, args.out)


if __name__ == "__main__":
    main()
