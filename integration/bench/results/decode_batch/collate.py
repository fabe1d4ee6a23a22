"""Collates mempipe-cpu-kernel-bench logs: per configuration, the sparse and dense kernels' ms
per layer (each run), their % of the same run's read bandwidth, and the median ratio to a base.

  python3 collate.py h200_host/run1 h200_host/run2 --base kb_base
Log names are <config>_<binary>_<rep>.log."""
import argparse, collections, glob, os, re, statistics

ap = argparse.ArgumentParser()
ap.add_argument("dirs", nargs="+")
ap.add_argument("--base", default="kb_base")
args = ap.parse_args()
runs = collections.defaultdict(list)  # (config, binary) -> [(sparse, s%, dense, d%)]
for d in args.dirs:
    for f in sorted(glob.glob(os.path.join(d, "*.log"))):
        m = re.match(r"(.+)_(kb_[a-z0-9]+)_(\d+)\.log$", os.path.basename(f))
        if not m:
            continue
        txt = open(f, errors="replace").read()
        sp = re.search(r"sparse attention \(selected K/V\)\s+([\d.]+) ms.*?(\d+)%", txt)
        de = re.search(r"dense attention \(all K/V\)\s+([\d.]+) ms.*?(\d+)%", txt)
        if sp and de:
            runs[(m.group(1), m.group(2))].append(
                (float(sp.group(1)), int(sp.group(2)), float(de.group(1)), int(de.group(2))))
configs = sorted({c for c, _ in runs})
print("| config | binary | runs | sparse ms (each run) | sparse % | dense ms (each run) | dense % |"
      " sparse / base | dense / base |")
print("|---|---|---|---|---|---|---|---|---|")
for c in configs:
    base = runs.get((c, args.base))
    for (cc, b), v in sorted(runs.items()):
        if cc != c:
            continue
        ratio = lambda i: (f"{statistics.median(x[i] for x in v) / statistics.median(x[i] for x in base):.2f}"
                           if base and b != args.base else "")
        print(f"| {c} | {b} | {len(v)} | {' '.join('%.3f' % x[0] for x in v)} | "
              f"{min(x[1] for x in v)}-{max(x[1] for x in v)} | {' '.join('%.3f' % x[2] for x in v)} | "
              f"{min(x[3] for x in v)}-{max(x[3] for x in v)} | {ratio(0)} | {ratio(2)} |")
