#!/usr/bin/env python3
"""Medians per shape, arm and thread count of pool_lines' logs (README.md):
    python3 collate.py call1 call2 call3
Each cell: median wall clock (min-max) over the rounds; for the kernels, the median % of the
same run's read in brackets (the bench's % on the floor's line is another figure, not shown)."""
import collections
import re
import statistics
import sys

KEYS = [("empty parallel call, wall", "floor us", 1000.0),
        ("sparse attention, wall", "sparse us", 1000.0),
        ("sparse layer, one call, wall", "sparse layer us", 1000.0),
        ("dense attention, wall", "dense ms", 1.0)]
NAME = re.compile(r"^(?P<shape>[a-z0-9]+)_(?P<arm>[a-z0-9]+?)(_t(?P<t>\d+))?_(?P<round>\d+)\.log$")


def parse(path):
    out = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        for key, _, scale in KEYS:
            if line.startswith("  " + key) and key not in out:
                f = line[len(key) + 2:].split()
                pct = next((x for x in f if x.endswith("%")), None)
                out[key] = (float(f[0]) * scale, float(pct[:-1]) if pct else None)
    return out


def main(dirs):
    import os
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for d in dirs:
        for name in sorted(os.listdir(d)):
            m = NAME.match(name)
            if not m:
                continue
            row = (m["shape"], int(m["t"] or 16), m["arm"])
            for key, val in parse(os.path.join(d, name)).items():
                cells[row][key].append(val)
    print("| shape | threads | arm | runs | " + " | ".join(k[1] for k in KEYS) + " |")
    print("|---|---|---|---|" + "---|" * len(KEYS))
    for row in sorted(cells):
        vals = cells[row]
        out = []
        for key, _, _ in KEYS:
            v = vals.get(key, [])
            if not v:
                out.append("-")
                continue
            t = [x for x, _ in v]
            p = [x for _, x in v if x is not None]
            cell = f"{statistics.median(t):.3g} ({min(t):.3g}-{max(t):.3g})"
            if p and key != KEYS[0][0]:
                cell += f" [{statistics.median(p):.0f}%]"
            out.append(cell)
        n = max(len(x) for x in vals.values())
        print(f"| {row[0]} | {row[1]} | {row[2]} | {n} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["call1", "call2", "call3"])
