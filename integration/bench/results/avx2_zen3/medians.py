"""Medians per (shape, build) of the wall-clock rows in ab_rot.sh's logs, and each build's time
over the first build's, paired by round:  python3 medians.py FOLDER BASE [BUILD ...]"""
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

folder, builds = Path(sys.argv[1]), sys.argv[2:]
rows = {"sparse": r"^  sparse attention, wall\s+([\d.]+) ms.*?(\d+)% \(",
        "dense": r"^  dense attention, wall\s+([\d.]+) ms.*?(\d+)% \("}
data = defaultdict(dict)  # (shape, kernel) -> {(build, round): (ms, pct)}
for f in folder.glob("*.log"):
    m = re.match(r"(.+)_([a-z0-9]+)_(\d+)$", f.stem)
    if not m:
        continue
    shape, build, rnd = m.group(1), m.group(2), int(m.group(3))
    text = f.read_text()
    for kernel, rx in rows.items():
        hit = re.search(rx, text, re.M)
        if hit:
            data[(shape, kernel)][(build, rnd)] = (float(hit.group(1)), int(hit.group(2)))
for (shape, kernel), v in sorted(data.items()):
    base = builds[0]
    parts = []
    for b in builds:
        ms = [x[0] for (bb, _), x in v.items() if bb == b]
        pct = [x[1] for (bb, _), x in v.items() if bb == b]
        if not ms:
            continue
        s = f"{b} {statistics.median(ms):.3f} ms ({min(pct)}-{max(pct)}%)"
        if b != base:
            ratios = [v[(b, r)][0] / v[(base, r)][0] for (bb, r) in v if bb == b and (base, r) in v]
            s += f" x{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        parts.append(s)
    print(f"{shape:12s} {kernel:6s} " + " | ".join(parts))
