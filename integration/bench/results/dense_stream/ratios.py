#!/usr/bin/env python3
"""new / old per round (back to back in the same round) for one kernel's wall time, its % of the
read, its bare reads' %, and (sparse) new / old from cache; median and range over rounds.
   python3 ratios.py LOGDIR [dense|sparse]"""
import pathlib, re, statistics, sys
kernel = sys.argv[2] if len(sys.argv) > 2 else "dense"
rows = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.log")):
    m = re.match(r"(.*)_(old|new)_(\d+)$", f.stem)
    if not m:
        continue
    text = f.read_text()
    def grab(label):
        r = re.search(r"^  " + re.escape(label) + r"\s+([\d.]+) ms .*?(\d+)% \(", text, re.M)
        return (float(r.group(1)), int(r.group(2))) if r else None
    rows.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[m.group(2)] = (
        grab(f"{kernel} attention, wall"), grab(f"{kernel} attention's reads, wall"),
        grab(f"{kernel} attention from cache, wall"))
def med(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
print(f"{kernel}: {'case':24} {'new/old':18} {'new ms':13} {'old ms':13} {'new %':9} {'old %':9} "
      "bare reads % new / old   from cache new/old")
for case, rounds in rows.items():
    pairs = [r for r in rounds.values() if "old" in r and "new" in r and r["old"][0] and r["new"][0]]
    if not pairs:
        continue
    ratio = [r["new"][0][0] / r["old"][0][0] for r in pairs]
    def span(key, i, j, fmt):
        xs = sorted(r[key][i][j] for r in pairs if r[key][i])
        return (fmt % xs[0]) + "-" + (fmt % xs[-1]) if xs else "-"
    print(f"  {case:30} {med(ratio):18} {span('new', 0, 0, '%.3f'):13} {span('old', 0, 0, '%.3f'):13} "
          f"{span('new', 0, 1, '%d')+'%':9} {span('old', 0, 1, '%d')+'%':9} "
          f"{span('new', 1, 1, '%d')}% / {span('old', 1, 1, '%d')}%   "
          f"{med(hot) if (hot := [r['new'][2][0] / r['old'][2][0] for r in pairs if r['new'][2] and r['old'][2]]) else '-'}")
