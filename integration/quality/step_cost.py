"""Cost of one decode step through the quality harness, per configuration, on one prompt.

    build/python-venv/bin/python integration/quality/step_cost.py --length 8000 --steps 4
    build/python-venv/bin/python integration/quality/step_cost.py --harness /tmp/old_quality

Builds one passkey prompt (seed --seed), prefills it densely once, then times --steps decode
steps of each configuration (dense SDPA, mempipe at --budget, per-query-head at --budget) and
prints seconds per step (median of the steps, after one warm-up run). --harness imports
smollm.py/tasks.py from another folder (e.g. an older version of this harness) so two versions
are timed on the same case.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", default=str(HERE),
                   help="folder holding smollm.py and tasks.py; default: this one")
    p.add_argument("--length", type=int, default=8000, help="prompt tokens; default: 8000")
    p.add_argument("--steps", type=int, default=4, help="timed decode steps; default: 4")
    p.add_argument("--budget", type=int, default=256, help="tokens per KV head; default: 256")
    p.add_argument("--page-size", type=int, default=16, help="page size; default: 16")
    p.add_argument("--seed", type=int, default=0, help="prompt seed; default: 0")
    p.add_argument("--threads", type=int, default=2, help="torch threads; default: 2")
    p.add_argument("--device", default="cpu", help="cpu or cuda; default: cpu")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    sys.path.insert(0, args.harness)
    import torch
    torch.set_num_threads(args.threads)
    import smollm
    import tasks
    model, tok = smollm.load_model()
    model = model.to(args.device)
    dec = smollm.Decoder(model)
    case = tasks.passkey_cases(tok, [args.length], [0.5], 1, args.seed)[0]
    ids = case.prompt_ids
    t0 = time.perf_counter()
    cache = dec.prefill(ids[:-1])
    print(f"[step_cost] harness {args.harness}: prefill of {len(ids) - 1} tokens "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    sels = [smollm.Selection.dense(),
            smollm.Selection("mempipe", args.budget, args.page_size),
            smollm.Selection("per_head", args.budget, args.page_size)]
    out = {"harness": args.harness, "length": len(ids), "steps": args.steps, "configs": {}}
    forced = ids[-1:] + [tok.encode(" 1", add_special_tokens=False)[-1]] * args.steps
    for sel in sels:
        dec.forced(cache, len(ids) - 1, forced[:2], sel)  # warm-up (fills the pages)
        per = []
        for _ in range(args.steps):
            run = dec.forced(cache, len(ids) - 1, forced[:2], sel)
            per.append(run.seconds)
        med = statistics.median(per)
        out["configs"][sel.name] = {"seconds_per_step": med, "all": per}
        print(f"[step_cost] {sel.name}: {med:.3f} s/step (median of {args.steps}: "
              f"{', '.join(f'{x:.3f}' for x in per)})", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
