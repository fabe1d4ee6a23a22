"""Medians per shape and binary of mempipe-cpu-kernel-bench logs named <shape>_<binary>_<rep>.log.

usage: python3 collate.py DIR [BASE]   (BASE: the binary the ratios are taken against)
Prints GB/s (CPU time per thread; "wall" rows: wall clock) for sparse and dense decode and their
reads, the ratio of median times to BASE's, and each run's % of the STREAM-like read measured in
the same run on the same clock.
"""
import collections
import glob
import re
import statistics
import sys

ROWS = [("sparse", r"sparse attention \("), ("dense", r"dense attention \("),
        ("sparse reads", r"sparse attention's reads  "), ("dense reads", r"dense attention's reads  "),
        # the wall-clock table, where the bench prints one (from fba61a7 on)
        ("sparse wall", r"sparse attention, wall"), ("dense wall", r"dense attention, wall"),
        ("sp.rd wall", r"sparse attention's reads, wall"),
        ("de.rd wall", r"dense attention's reads, wall")]


def main(d, base):
    res = collections.defaultdict(list)
    for f in sorted(glob.glob(d + "/*.log")):
        m = re.match(r"(.*)_(kb_\w+?)_(\d+)\.log$", f.split("/")[-1])
        if not m:
            continue
        shape, binary, _ = m.groups()
        txt = open(f).read()
        for name, pat in ROWS:
            mm = re.search(pat + r".*?\s+([\d.]+) ms\s+[\d.]+ MiB\s+([\d.]+) GB/s\s+(\d+)%", txt)
            if mm:
                res[(shape, name, binary)].append((float(mm.group(2)), int(mm.group(3))))
    binaries = sorted({b for _, _, b in res})
    for shape in sorted({s for s, _, _ in res}):
        print(shape)
        for name, _ in ROWS:
            ref = res.get((shape, name, base))
            if not ref:
                continue
            ref_med = statistics.median(x[0] for x in ref)
            for b in binaries:
                runs = res.get((shape, name, b))
                if not runs:
                    continue
                med = statistics.median(x[0] for x in runs)
                print(f"  {name:12s} {b:14s} {med:6.1f} GB/s  time/{base} {ref_med / med:.2f}"
                      f"  % of read {sorted(x[1] for x in runs)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "kb_pool_base")
