#!/usr/bin/env python3
"""Per-round ratios of sparse decode's wall time, stream against next_page (or new against old),
from mempipe-cpu-kernel-bench logs named CASE_{A}_{round}.log / CASE_{B}_{round}.log.
   python3 ratios.py LOGDIR [A B]     (default A=next_page B=stream)
Prints, per case: B's times, A's times, B/A per round and its median, and B's % of the read."""
import os
import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(r"^  sparse attention, wall\s+([\d.]+) ms\s+\S+ MiB\s+\S+ GB/s\s+(\d+)%")


def wall(path):
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                return float(m.group(1)), int(m.group(2))
    return None


def main():
    d = sys.argv[1]
    a, b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("next_page", "stream")
    cases = defaultdict(dict)
    pat = re.compile(r"^(.*)_(%s|%s)_(\d+)\.log$" % (re.escape(a), re.escape(b)))
    for name in sorted(os.listdir(d)):
        m = pat.match(name)
        if m:
            r = wall(os.path.join(d, name))
            if r:
                cases[m.group(1)].setdefault(int(m.group(3)), {})[m.group(2)] = r
    for case in sorted(cases):
        rounds = [cases[case][r] for r in sorted(cases[case]) if len(cases[case][r]) == 2]
        if not rounds:
            continue
        ratios = [x[b][0] / x[a][0] for x in rounds]
        print("%-22s %s %s ms, %s %s ms, %s/%s %s, median %.2f; %s %% of read %s" % (
            case, b, "/".join("%.3f" % x[b][0] for x in rounds), a,
            "/".join("%.3f" % x[a][0] for x in rounds), b, a,
            "/".join("%.2f" % r for r in ratios), statistics.median(ratios), b,
            "/".join("%d" % x[b][1] for x in rounds)))


if __name__ == "__main__":
    main()
