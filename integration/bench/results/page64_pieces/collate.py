#!/usr/bin/env python3
"""Medians (ranges) over the rounds of run.sh's logs, wall clock: sparse kernel, its bare reads
and dense kernel as % of the STREAM-like read taken around them, and sparse ms per layer.
    python3 collate.py [LOGDIR]   (default logs)"""
import collections
import glob
import re
import statistics as st
import sys

logdir = sys.argv[1] if len(sys.argv) > 1 else "logs"
rows = collections.defaultdict(list)
for f in sorted(glob.glob(f"{logdir}/smol_bf16_p*_t*_*.log")):
    page, layout, threads = re.search(r"_p(\d+)_(\w+)_t(\d)_\d+\.log$", f).groups()
    text = open(f).read()
    wall = text[text.index("wall clock:"):]

    def row(name):
        m = re.search(re.escape(name) + r"\s+([\d.]+) ms\s+[\d.]+ MiB\s+[\d.]+ GB/s\s+(\d+)%", wall)
        return float(m.group(1)), int(m.group(2))
    rows[(int(page), layout, int(threads))].append(
        (row("sparse attention, wall"), row("sparse attention's reads, wall"),
         row("dense attention, wall")))


def fmt(xs):
    return f"{st.median(xs):g}% ({min(xs)}-{max(xs)})"


print("| threads | page | layout | sparse kernel | its bare reads | sparse ms/layer | dense kernel | rounds |")
print("|---|---|---|---|---|---|---|---|")
for (page, layout, threads), v in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
    print(f"| {threads} | {page} | {layout} | {fmt([x[0][1] for x in v])} | "
          f"{fmt([x[1][1] for x in v])} | {st.median(x[0][0] for x in v):.3f} | "
          f"{fmt([x[2][1] for x in v])} | {len(v)} |")
