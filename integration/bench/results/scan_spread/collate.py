#!/usr/bin/env python3
"""Medians per shape, dtype, thread count and arm of run.sh's runs.

    python3 collate.py DIR [DIR ...]

Reads each DIR's *.log (mempipe-cpu-kernel-bench output), or its summary.txt where the logs did
not come back. Prints, per group, the median wall time per layer over the rounds (with the
range) and the median of the runs' % of the read, for the scan, scan + top-k, sparse attention
and the whole sparse layer in one call; then each arm over the first (base, else new, else the
first by name).
"""
import glob
import os
import re
import statistics
import sys
from collections import defaultdict

ROWS = ["relevancy scan (digests), wall", "scan + top-k, one call, wall", "sparse attention, wall",
        "sparse layer, one call, wall"]
SHORT = ["scan", "scan+top-k", "sparse attn", "sparse layer"]
NAME = re.compile(r"(\w+?)_(bf16|fp32)_t(\d+)_(\w+?)_(\d+)$")


def from_log(path):
    vals = []
    text = open(path).read().splitlines()
    for row in ROWS:
        line = next((l for l in text if l.startswith("  " + row)), None)
        if line is None:
            return None
        f = line[len("  " + row):].split()
        ms = float(f[0])
        pct = next((float(x[:-1]) for x in f if x.endswith("%")), float("nan"))
        vals.append((ms, pct))
    return vals


def from_summary(path):
    runs = {}
    for line in open(path):
        f = line.split()
        if not f:
            continue
        nums = re.findall(r"([\d.]+) \(([\d-]+)%?\)", line)
        runs[f[0]] = [(float(a), float(b) if b != "-" else float("nan")) for a, b in nums]
    return runs


def main(dirs):
    groups = defaultdict(list)
    for d in dirs:
        logs = sorted(glob.glob(os.path.join(d, "*.log")))
        runs = {}
        if os.path.exists(os.path.join(d, "summary.txt")):
            runs.update(from_summary(os.path.join(d, "summary.txt")))
        for p in logs:
            v = from_log(p)
            if v:
                runs[os.path.basename(p)[:-4]] = v
        for name, v in runs.items():
            m = NAME.match(name)
            if m and len(v) == len(ROWS):
                shape, dt, t, arm, _ = m.groups()
                groups[(shape, dt, int(t), arm)].append(v)
    keys = sorted({k[:3] for k in groups})
    print("wall per layer in ms: median (range) over the rounds [median % of the read]")
    for k in keys:
        found = {g[3] for g in groups if g[:3] == k}
        arms = [a for a in ("base", "new") if a in found] + sorted(found - {"base", "new"})
        meds = {}
        for a in arms:
            rs = groups[k + (a,)]
            cells = []
            meds[a] = []
            for i, s in enumerate(SHORT):
                ms = [r[i][0] for r in rs]
                pc = [r[i][1] for r in rs]
                med = statistics.median(ms)
                meds[a].append(med)
                cells.append(f"{s} {med:.3f} ({min(ms):.3f}-{max(ms):.3f}) [{statistics.median(pc):.0f}%]")
            print(f"{k[0]} {k[1]} {k[2]:>2}T {a:<4} n={len(rs)}: " + "; ".join(cells))
        for a in arms[1:]:
            print(f"{'':>14}{a}/{arms[0]}: " + "; ".join(
                f"{s} {n / b:.2f}" for s, n, b in zip(SHORT, meds[a], meds[arms[0]])))


if __name__ == "__main__":
    main(sys.argv[1:])
