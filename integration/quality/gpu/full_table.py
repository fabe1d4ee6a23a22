"""The H200 full-model grid (run_h200_full.sh) as one Markdown table and a JSON summary.

    build/python-venv/bin/python integration/quality/gpu/full_table.py \
        integration/quality/results/h200_full

Reads DIR/tasks_<L>/results.json where it came back, else DIR/tasks_<L>.log (run.py's progress
lines name every case, configuration, hit/miss and answer: enough for the hit counts, not for
bytes or KL), and DIR/ppl_8k/results.json. Per configuration: hits on the cases dense answers
(k of n) per length, bytes read per step as a fraction of dense (task runs at 2048/4096 tokens
from their JSON; the 8K perplexity run for 8K), and the 8K perplexity ratio with its 95%
interval (exp(mean +- 1.96 sd / sqrt(n)) of the per-token NLL differences), KL and top-1.
Writes DIR/summary.md, DIR/summary.json and DIR/bytes_frontier.png (quality vs bytes read,
GQA-aware and per-query-head selection: the comparison at equal bytes).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys

LINE = re.compile(r"\] (\S+) (\S+): (hit |miss) (.*) \(answer (\S+); ")


def cases_from_log(path: pathlib.Path) -> list[dict]:
    cases: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        m = LINE.search(line)
        if m:
            name, config, state, text, answer = m.groups()
            c = cases.setdefault(name, {"name": name, "task": name.split("/")[0],
                                        "answer": answer, "runs": {}})
            c["runs"][config] = {"hit": state.strip() == "hit", "text": text}
    return list(cases.values())


def load_tasks(d: pathlib.Path, length: int):
    js = d / f"tasks_{length}" / "results.json"
    if js.is_file():
        r = json.loads(js.read_text())
        return r["cases"], r["configurations"], "results.json"
    log = d / f"tasks_{length}.log"
    cases = cases_from_log(log)
    configs = list(cases[0]["runs"]) if cases else []
    return cases, configs, "log"


def main(d: str) -> None:
    d = pathlib.Path(d)
    lengths = sorted(int(p.name.split("_")[1].split(".")[0]) for p in d.glob("tasks_*.log"))
    ppl = json.loads((d / "ppl_8k" / "results.json").read_text())
    w = ppl["ppl"][0]["runs"]
    configs = ppl["configurations"]
    summary = {"source": {}, "configs": {}}
    for length in lengths:
        cases, cfgs, src = load_tasks(d, length)
        summary["source"][str(length)] = f"{src}, {len(cases)} cases"
        ok = [c for c in cases if c["runs"]["dense"]["hit"]]
        for name in cfgs:
            s = summary["configs"].setdefault(name, {})
            s[f"hits_{length}"] = [sum(c["runs"][name]["hit"] for c in ok), len(ok)]
            s[f"all_{length}"] = [sum(c["runs"][name]["hit"] for c in cases), len(cases)]
            if src == "results.json":
                runs = [c["runs"][name] for c in cases]
                s[f"bytes_{length}"] = sum(r["bytes_per_step"] / r["dense_bytes_per_step"]
                                           for r in runs) / len(runs)
    dense_nll = w["dense"]["nll_tokens"]
    for name in configs:
        r = w[name]
        diff = [a - b for a, b in zip(r["nll_tokens"], dense_nll)]
        n = len(diff)
        mean = sum(diff) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / (n - 1))
        s = summary["configs"].setdefault(name, {})
        s.update(ppl_ratio=math.exp(mean), ppl_lo=math.exp(mean - 1.96 * sd / math.sqrt(n)),
                 ppl_hi=math.exp(mean + 1.96 * sd / math.sqrt(n)), kl=r["kl"], top1=r["top1"],
                 bytes_ppl8k=r["bytes_per_step"] / r["dense_bytes_per_step"])
    head = "| configuration | " + " | ".join(f"hits @{L} (dense right)" for L in lengths)
    head += " | bytes vs dense (8K PPL run) | PPL ratio 8K [95% CI] | KL | top-1 |"
    lines = [head, "|" + "---|" * (len(lengths) + 5)]
    for name in configs:
        s = summary["configs"][name]
        cells = [f"{s[f'hits_{L}'][0]}/{s[f'hits_{L}'][1]}" if f"hits_{L}" in s else "–"
                 for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {s['bytes_ppl8k']:.3f} | {s['ppl_ratio']:.3f} [{s['ppl_lo']:.3f}, "
                     f"{s['ppl_hi']:.3f}] | {s['kl']:.4f} | {s['top1']:.3f} |")
    dense_all = " ".join(f"{L}: {summary['configs']['dense'][f'all_{L}'][0]}/"
                         f"{summary['configs']['dense'][f'all_{L}'][1]}" for L in lengths)
    text = "\n".join(lines) + f"\n\nDense answers {dense_all} of all cases; sources: " + \
        ", ".join(f"{k} tokens: {v}" for k, v in summary["source"].items()) + "\n"
    (d / "summary.md").write_text(text)
    (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    plot(d, summary, lengths)


def plot(d: pathlib.Path, summary: dict, lengths: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [L for L in lengths if any(f"bytes_{L}" in s for s in summary["configs"].values())]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.6))
    for kind, style in (("mempipe", "o-"), ("per_head", "s--")):
        items = [(None, k) for k in summary["configs"] if k.startswith(kind)]
        for ax, L in zip(axes, panels):
            pts = sorted((v[f"bytes_{L}"], v[f"hits_{L}"][0] / v[f"hits_{L}"][1])
                         for v in (summary["configs"][k] for _, k in items))
            ax.plot(*zip(*pts), style, label="GQA-aware" if kind == "mempipe" else
                    "per-query-head")
            ax.set_title(f"tasks at {L} tokens (dense right)")
            ax.set_xlabel("bytes read per step / dense")
            ax.set_ylabel("hit rate")
        pts = sorted((summary["configs"][k]["bytes_ppl8k"], summary["configs"][k]["ppl_ratio"])
                     for _, k in items)
        axes[-1].plot(*zip(*pts), style, label="GQA-aware" if kind == "mempipe" else
                      "per-query-head")
    axes[-1].set_title("perplexity, 7936 + 256 tokens")
    axes[-1].set_xlabel("bytes read per step / dense")
    axes[-1].set_ylabel("PPL ratio to dense")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M (30 layers) on the H200, page 16, 2 dense layers", fontsize=9)
    fig.tight_layout()
    fig.savefig(d / "bytes_frontier.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "integration/quality/results/h200_full")
