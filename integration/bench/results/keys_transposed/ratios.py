"""Per-round ratios of each layout's wall time to head-major's (same round, alternated runs),
and the median % of the read: python3 ratios.py LOGDIR"""
import collections, glob, os, re, statistics, sys

rows = collections.defaultdict(dict)  # (shape_dtype_threads, kernel, round) -> layout -> (ms, %)
for f in glob.glob(os.path.join(sys.argv[1], '*.log')):
    parts = os.path.basename(f)[:-4].split('_')
    rnd, shape, layout = parts[-1], '_'.join(parts[:3]), '_'.join(parts[3:-1])
    for line in open(f):
        m = re.match(r"\s+(sparse attention|dense attention|sparse attention from cache), wall\s+"
                     r"([\d.]+) ms.*?(\d+)% \(", line)
        if m:
            rows[(shape, m.group(1), rnd)][layout] = (float(m.group(2)), int(m.group(3)))
out = collections.defaultdict(lambda: collections.defaultdict(list))
for (shape, kernel, rnd), by in rows.items():
    for layout, (ms, pct) in by.items():
        out[(shape, kernel)][layout].append((ms / by['head'][0] if 'head' in by else float('nan'), pct))
for (shape, kernel) in sorted(out):
    cells = []
    for layout in ('head', 'page', 'head_kt', 'page_kt'):
        v = out[(shape, kernel)].get(layout)
        if not v:
            continue
        r = sorted(x[0] for x in v); p = sorted(x[1] for x in v)
        cells.append(f"{layout} {statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f}) "
                     f"{statistics.median(p):.0f}% ({p[0]}-{p[-1]})")
    print(f"{shape:16s} {kernel:28s} " + " | ".join(cells))
