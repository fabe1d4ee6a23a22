#!/usr/bin/env python3
"""Summarizes layer_timeline's event files (README.md).

  python3 timeline.py DIR...      (each DIR holds <dtype>_t<threads>.csv and .txt)

Per run and phase, medians over the calls (microseconds after the call's start):
  tasks    events per call (tasks, or rows reported)
  start    first / median / last task start
  dur      shortest / median / longest task
  end      the last task's end, and the call's wall time (from the .txt)
For `layer`, also the critical path: when the last row was selected, and how long the row that
ended last took to attend; for `attn`, how much longer a row took with the others running than
alone (`attn1`).
"""
import collections
import csv
import glob
import os
import re
import statistics
import sys


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(path):
    calls = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(path) as f:
        for e in csv.DictReader(f):
            calls[e["phase"]][int(e["call"])].append(
                (int(e["thread"]), int(e["row"]), float(e["start_us"]), float(e["end_us"])))
    walls = {}
    txt = path[:-4] + ".txt"
    if os.path.exists(txt):
        for line in open(txt):
            parts = line.split()
            if parts and re.match(r"^[a-z0-9]+$", parts[0]) and len(parts) >= 2:
                try:
                    walls[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    out = []
    for phase in ["meet", "scan", "attn", "attn1", "layer"]:
        per = calls.get(phase)
        if not per:
            continue
        n, s0, s50, s1, d0, d50, d1, e1 = ([] for _ in range(8))
        for evs in per.values():
            starts = sorted(e[2] for e in evs)
            durs = sorted(e[3] - e[2] for e in evs)
            n.append(len(evs))
            s0.append(starts[0])
            s50.append(starts[len(starts) // 2])
            s1.append(starts[-1])
            d0.append(durs[0])
            d50.append(durs[len(durs) // 2])
            d1.append(durs[-1])
            e1.append(max(e[3] for e in evs))
        line = (f"  {phase:6s} tasks {med(n):4.0f}  start {med(s0):6.2f} / {med(s50):6.2f} / "
                f"{med(s1):6.2f}  dur {med(d0):6.2f} / {med(d50):6.2f} / {med(d1):6.2f}  "
                f"end {med(e1):7.2f}  wall {walls.get(phase, float('nan')):7.2f}")
        out.append(line)
        if phase == "layer":
            last_dur = []
            for evs in per.values():
                last = max(evs, key=lambda e: e[3])
                last_dur.append(last[3] - last[2])
            out.append(f"         critical path: last row selected at {med(s1):.2f}, the "
                       f"row that ended last attended in {med(last_dur):.2f}")
    if "attn" in calls and "attn1" in calls:
        alone = med([e[3] - e[2] for evs in calls["attn1"].values() for e in evs])
        crowd = med([e[3] - e[2] for evs in calls["attn"].values() for e in evs])
        out.append(f"         a row attended alone {alone:.2f}, beside the others {crowd:.2f} "
                   f"({crowd / alone:.2f}x)")
    return out


def main():
    for d in sys.argv[1:]:
        for path in sorted(glob.glob(os.path.join(d, "*.csv"))):
            print(os.path.basename(path)[:-4])
            for line in summarize(path):
                print(line)


if __name__ == "__main__":
    main()
