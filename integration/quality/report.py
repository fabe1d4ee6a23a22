"""Summarizes OUT/results.json (run.py) into OUT/results.md and two plots.

    build/python-venv/bin/python integration/quality/report.py [OUT]

Per configuration: accuracy over all task cases with dense's own accuracy beside it; accuracy
on the cases dense gets right (the issue's target); first-answer-token KL and top-1 agreement
with dense; perplexity ratio to dense, mean KL(dense || config) and top-1 agreement over the
teacher-forced steps; bytes read from the KV cache per decode step (mean, and as a fraction of
dense). Plots: accuracy vs budget and PPL ratio vs budget, one line per (kind, page size,
aggregation, dense_layers) series.
"""

from __future__ import annotations

import json
import pathlib
import sys


def summarize(result: dict) -> list[dict]:
    rows = []
    cases = result["cases"]
    dense_ok = [c for c in cases if c["runs"]["dense"]["hit"]]
    done = set(result["configurations"][:1])  # configurations with any result
    for c in cases:
        done.update(c["runs"])
    for w in result["ppl"]:
        done.update(w["runs"])
    for name in [n for n in result["configurations"] if n in done]:
        sel = result["selections"][name]
        row = {"name": name, **sel}
        if cases:
            runs = [c["runs"][name] for c in cases]
            row["acc"] = sum(r["hit"] for r in runs) / len(runs)
            row["acc_dense"] = len(dense_ok) / len(cases)
            row["n_cases"] = len(cases)
            row["acc_on_dense_ok"] = (sum(c["runs"][name]["hit"] for c in dense_ok)
                                      / len(dense_ok)) if dense_ok else float("nan")
            row["n_dense_ok"] = len(dense_ok)
            row["first_kl"] = sum(r["first_kl"] for r in runs) / len(runs)
            row["first_top1"] = sum(r["first_top1"] for r in runs) / len(runs)
            row["bytes_frac_tasks"] = sum(r["bytes_per_step"] / r["dense_bytes_per_step"]
                                          for r in runs) / len(runs)
            row["s_per_step_tasks"] = sum(r["seconds_per_step"] for r in runs) / len(runs)
            per_task = {}
            for c in cases:
                t = per_task.setdefault(c["task"], [0, 0, 0])
                t[0] += c["runs"][name]["hit"]
                t[1] += c["runs"]["dense"]["hit"]
                t[2] += 1
            row["per_task"] = per_task
            row["hits"] = sum(r["hit"] for r in runs)
            row["hits_on_dense_ok"] = sum(c["runs"][name]["hit"] for c in dense_ok)
            per_len = {}
            for c in cases:  # length -> [hits where dense right, dense right, hits, cases]
                t = per_len.setdefault(str(c["length"]), [0, 0, 0, 0])
                ok = c["runs"]["dense"]["hit"]
                t[0] += ok and c["runs"][name]["hit"]
                t[1] += ok
                t[2] += c["runs"][name]["hit"]
                t[3] += 1
            row["per_length"] = per_len
        windows = [w for w in result["ppl"] if name in w["runs"]]  # a stopped run: partial
        if windows:
            runs = [w["runs"][name] for w in windows]
            dense = [w["runs"]["dense"] for w in windows]
            nll = sum(r["nll"] for r in runs) / len(runs)
            dnll = sum(r["nll"] for r in dense) / len(dense)
            row["ppl"] = 2.718281828459045 ** nll
            row["ppl_ratio"] = 2.718281828459045 ** (nll - dnll)
            row["ppl_tokens"] = sum(len(r.get("nll_tokens", [])) for r in runs)
            lo, hi = ppl_ratio_ci(runs, dense)
            row["ppl_ratio_ci"] = [lo, hi]
            row["kl"] = sum(r["kl"] for r in runs) / len(runs)
            row["top1"] = sum(r["top1"] for r in runs) / len(runs)
            row["bytes_per_step"] = sum(r["bytes_per_step"] for r in runs) / len(runs)
            row["bytes_frac"] = row["bytes_per_step"] / (
                sum(r["dense_bytes_per_step"] for r in runs) / len(runs))
            row["s_per_step"] = sum(r["seconds_per_step"] for r in runs) / len(runs)
        rows.append(row)
    return rows


def ppl_ratio_ci(runs, dense, z: float = 1.96) -> tuple[float, float]:
    """95% interval of the PPL ratio from the per-token NLL differences (config - dense, same
    tokens, pooled over windows): exp(mean +- z * sd / sqrt(n)). Neighbouring tokens are not
    independent, so this is a normal-approximation interval, not an exact one."""
    import math
    diffs = [a - b for r, d in zip(runs, dense)
             for a, b in zip(r.get("nll_tokens", []), d.get("nll_tokens", []))]
    if len(diffs) < 2:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    half = z * sd / math.sqrt(len(diffs))
    return math.exp(mean - half), math.exp(mean + half)


def _fmt(x, spec):
    return "–" if x is None or x != x else format(x, spec)


def markdown(result: dict, rows: list[dict]) -> str:
    lines = [
        "# mempipe quality on SmolLM2-135M-Instruct",
        "",
        f"- model: {result['model']}",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}, torch threads {result['torch_threads']}; device "
        f"{result.get('device', 'cpu')}; decode path {result.get('decode_path', '')}",
        f"- case seed: {result.get('seed', 0)}",
        f"- wall time: {result['wall_seconds'] / 60:.1f} min (measured)",
        f"- task cases: {len(result['cases'])} "
        f"({', '.join(sorted({c['name'].split('/L')[0] + '/L' + str(c['length']) for c in result['cases']}))})"
        if result["cases"] else "- task cases: none",
        f"- perplexity: {len(result['ppl'])} window(s) of "
        + (f"{result['ppl'][0]['context']} context + {result['ppl'][0]['steps']} scored tokens"
           if result["ppl"] else "none"),
        f"- bytes: K/V of the attended tokens + page digests (min and max), all layers, at "
        f"{result['element_bytes']} bytes/element; per-head selection counts the union of the "
        "group's pages (what a kernel reading shared KV pages would load)",
        "",
        "| configuration | hits | dense hits | hits where dense right | 1st-token KL | "
        "1st-token top-1 | PPL ratio [95% CI] | KL (PPL steps) | top-1 (PPL steps) | "
        "MB read / step | fraction of dense | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r.get("n_cases", 0)
        acc = f"{r['hits']}/{n}" if "hits" in r else "–"
        dacc = f"{round(r['acc_dense'] * n)}/{n}" if "hits" in r else "–"
        ok = f"{r['hits_on_dense_ok']}/{r['n_dense_ok']}" if "hits" in r else "–"
        ci = r.get("ppl_ratio_ci", [float("nan")] * 2)
        ppl = (f"{_fmt(r.get('ppl_ratio'), '.4f')} [{_fmt(ci[0], '.4f')}, {_fmt(ci[1], '.4f')}]"
               if "ppl_ratio" in r else "–")
        lines.append(
            f"| {r['name']} | {acc} | {dacc} | {ok} | "
            f"{_fmt(r.get('first_kl'), '.4f')} | {_fmt(r.get('first_top1'), '.2f')} | "
            f"{ppl} | {_fmt(r.get('kl'), '.4f')} | "
            f"{_fmt(r.get('top1'), '.3f')} | "
            f"{_fmt(r.get('bytes_per_step', 0) / 2**20 if 'bytes_per_step' in r else None, '.1f')}"
            f" | {_fmt(r.get('bytes_frac', r.get('bytes_frac_tasks')), '.3f')} | "
            f"{_fmt(r.get('s_per_step', r.get('s_per_step_tasks')), '.2f')} |")
    if result["cases"]:
        tasks_ = sorted({c["task"] for c in result["cases"]})
        lines += ["", "Per task (hits / cases; dense's hits in brackets):", "",
                  "| configuration | " + " | ".join(tasks_) + " |",
                  "|---|" + "---|" * len(tasks_)]
        for r in rows:
            cells = [f"{r['per_task'][t][0]}/{r['per_task'][t][2]} ({r['per_task'][t][1]})"
                     for t in tasks_]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lengths = sorted({c["length"] for c in result["cases"]})
        lines += ["", "By prompt length: hits on the cases dense gets right / those cases "
                  "(all hits / all cases in brackets):", "",
                  "| configuration | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for r in rows:
            cells = []
            for n in lengths:
                t = r["per_length"][str(n)]
                cells.append(f"{t[0]}/{t[1]} ({t[2]}/{t[3]})")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines += ["", "Cases (generated text per configuration is in results.json):", "",
                  "| case | tokens | answer | dense | hits among sparse configurations |",
                  "|---|---|---|---|---|"]
        for c in result["cases"]:
            sparse = [n for n in result["configurations"] if n != "dense"]
            lines.append(f"| {c['name']} | {c['length']} | {c['answer']} | "
                         f"{'hit' if c['runs']['dense']['hit'] else 'miss'} "
                         f"{c['runs']['dense']['text']!r} | "
                         f"{sum(c['runs'][n]['hit'] for n in sparse)}/{len(sparse)} |")
    return "\n".join(lines) + "\n"


def _series(rows):
    groups = {}
    for r in rows:
        if r["kind"] == "dense":
            continue
        key = (r["kind"], r["page_size"], r["aggregation"] if r["kind"] == "mempipe" else "",
               r["dense_layers"])
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["budget"]) for k, v in groups.items()}


def plots(out: pathlib.Path, rows: list[dict], result: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    dense = next(r for r in rows if r["kind"] == "dense")
    specs = [("acc_on_dense_ok", "accuracy on cases dense gets right", "accuracy_vs_budget.png",
              1.0), ("ppl_ratio", "perplexity / dense perplexity", "ppl_ratio_vs_budget.png",
                     1.0)]
    for key, label, fname, ref in specs:
        if key not in dense:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (kind, p, agg, dl), rs in sorted(_series(rows).items()):
            xs = [r["budget"] for r in rs if r.get(key) == r.get(key)]
            ys = [r[key] for r in rs if r.get(key) == r.get(key)]
            if not xs:
                continue
            style = "-o" if len(xs) > 1 else "s"
            name = f"{kind} p{p}{' ' + agg if agg else ''} dl{dl}"
            ax.plot(xs, ys, style, label=name, alpha=0.85)
        ax.axhline(ref, color="k", lw=0.8, ls="--", label="dense")
        if key == "ppl_ratio":
            ax.axhline(1.01, color="g", lw=0.6, ls=":", label="target at 1024 (+1%)")
            ax.axhline(1.05, color="r", lw=0.6, ls=":", label="target at 256 (+5%)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel(label)
        ax.set_title(f"SmolLM2-135M, mempipe decode: {label}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write(out) -> None:
    out = pathlib.Path(out)
    result = json.loads((out / "results.json").read_text())
    rows = summarize(result)
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "results.md").write_text(markdown(result, rows))
    names = plots(out, rows, result)
    print(f"[quality] wrote {out / 'results.md'}, summary.json, {', '.join(names)}", flush=True)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "results")
