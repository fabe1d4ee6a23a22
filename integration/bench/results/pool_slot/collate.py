#!/usr/bin/env python3
"""Collates run.sh's logs: per shape and arm, the wall-clock ms per layer of sparse decode (with
% of the read), sparse from cache and dense, one figure per round, and each arm's median.
    python3 collate.py call1 [call2 ...]"""
import collections
import pathlib
import re
import statistics
import sys

ARMS = ("old", "slot", "slot1k", "keep", "omp")


def figure(text, label):
    m = re.search(r"^  " + re.escape(label) + r"\s+([0-9.]+) ms.*?(\d+)% \(", text, re.M)
    return (float(m.group(1)), int(m.group(2))) if m else None


def main(dirs):
    for d in dirs:
        rows = collections.defaultdict(dict)
        for f in sorted(pathlib.Path(d).glob("*.log")):
            m = re.match(r"(.*)_(" + "|".join(ARMS) + r")_(\d+)\.log$", f.name)
            if not m:
                continue
            shape, arm, r = m.group(1), m.group(2), int(m.group(3))
            text = f.read_text(errors="replace")
            rows[shape].setdefault(arm, []).append(
                (r, figure(text, "sparse attention, wall"),
                 figure(text, "sparse attention from cache, wall"),
                 figure(text, "dense attention, wall")))
        print(f"== {d}: wall ms per layer by round (sparse % of the read); median")
        for shape in sorted(rows):
            for arm in ARMS:
                runs = sorted(rows[shape].get(arm, []))
                if not runs:
                    continue
                sp = [r[1] for r in runs if r[1]]
                fc = [r[2][0] for r in runs if r[2]]
                de = [r[3][0] for r in runs if r[3]]
                print(f"{shape:18s} {arm:6s} sparse " +
                      " ".join(f"{t:.3f}({p}%)" for t, p in sp) +
                      f"  med {statistics.median(t for t, _ in sp):.3f}"
                      f" | cache med {statistics.median(fc):.3f}"
                      f" | dense med {statistics.median(de):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["call1"])
