#!/usr/bin/env python3
"""new / old per round (same round, back to back) for the sparse kernel's wall time, its % of
the read, and from cache; median (range) over rounds.   python3 ratios.py LOGDIR"""
import pathlib, re, statistics, sys
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
        grab("sparse attention, wall"), grab("sparse attention from cache, wall"))
def med(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
print(f"{'case':28} {'DRAM new/old':18} {'new % of read':14} {'old % of read':14} from cache new/old")
for case, rounds in rows.items():
    pairs = [r for r in rounds.values() if "old" in r and "new" in r and r["old"][0] and r["new"][0]]
    if not pairs:
        continue
    dram = [r["new"][0][0] / r["old"][0][0] for r in pairs]
    hot = [r["new"][1][0] / r["old"][1][0] for r in pairs if r["new"][1] and r["old"][1]]
    pn = sorted(r["new"][0][1] for r in pairs)
    po = sorted(r["old"][0][1] for r in pairs)
    print(f"{case:28} {med(dram):18} {pn[0]}-{pn[-1]}%{'':8} {po[0]}-{po[-1]}%{'':8} {med(hot)}")
