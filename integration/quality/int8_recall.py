#!/usr/bin/env python3
"""Selection recall of int8 digests against native ones on SmolLM2 (issue 11's "selection recall").

The perplexity window of run.py (the Python reference's prose: `--context` tokens prefilled,
then `--steps` tokens teacher-forced through the decode path) is decoded twice per budget, with
native and with int8 digests (digest_dtype=int8); both runs feed the same tokens, so every step
and sparse layer scores the same keys with the same query in both, and the selections can be
compared one to one. Recall = of the middle pages (neither sink nor local) the native selection
picks per (step, sparse layer, KV head), the fraction the int8 selection also picks; `same` =
the share of (step, layer, head) rows whose page sets are identical.

    build/python-venv/bin/python integration/quality/int8_recall.py --context 1792 --steps 32 \
        --budgets 512,1024 --threads 1 --out integration/quality/results/int8_2k/recall.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm  # noqa: E402
import tasks  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1792, help="prefilled tokens (default 1792)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced steps (default 32)")
    ap.add_argument("--budgets", default="512,1024", help="comma list of token budgets")
    ap.add_argument("--page", type=int, default=16, help="page size (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = smollm.load_model()
    dec = smollm.Decoder(model, keep_selections=True)
    ids = tok.encode(tasks.natural_text(), add_special_tokens=False)
    window = ids[:args.context + args.steps]
    prefix = args.context - 1
    cache = dec.prefill(window[:prefix])
    out = {"command": "build/python-venv/bin/python integration/quality/int8_recall.py "
                      + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                      f"torch thread(s), Linux {platform.release()}",
           "context": args.context, "steps": args.steps, "page": args.page, "budgets": {}}
    for budget in (int(b) for b in args.budgets.split(",") if b):
        runs = {}
        for dd in ("native", "int8"):
            extra = "digest_dtype=int8" if dd == "int8" else ""
            sel = smollm.Selection("mempipe", budget=budget, page_size=args.page, extra=extra)
            runs[dd] = dec.forced(cache, prefix, window[prefix:], sel)
            print(f"[int8_recall] B={budget} {dd}: {runs[dd].seconds:.1f} s", flush=True)
        hits = total = same = rows = 0
        for step, (nat, q8) in enumerate(zip(runs["native"].selections,
                                             runs["int8"].selections)):
            n_pages = -(-(args.context + step) // args.page)
            for (pn, cn), (p8, c8) in zip(nat, q8):
                for h in range(pn.shape[1]):
                    a = set(pn[0, h, :int(cn[0, h])].tolist())
                    b = set(p8[0, h, :int(c8[0, h])].tolist())
                    middle = {p for p in a if smollm.SINKS <= p < n_pages - smollm.LOCALS}
                    hits += len(middle & b)
                    total += len(middle)
                    same += a == b
                    rows += 1
        out["budgets"][str(budget)] = {
            "recall_middle_pages": hits / total if total else None, "middle_pages": total,
            "identical_rows": same / rows if rows else None, "rows": rows}
        print(f"[int8_recall] B={budget}: recall {hits}/{total} = {hits / max(total, 1):.4f}, "
              f"identical (step, layer, head) rows {same}/{rows}", flush=True)
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"[int8_recall] wrote {args.out}")


if __name__ == "__main__":
    main()
