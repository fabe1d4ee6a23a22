"""Median ms per layer (wall clock) and the range of % of the read, per shape and arm, from
mempipe-cpu-kernel-bench logs named <shape>_<rep>_<arm>.log; xN = median against the first arm
named on the command line. Usage: python3 collate.py DIR ARM [ARM...]"""
import glob, os, re, statistics as st, sys

d, arms = sys.argv[1], sys.argv[2:]
rows = {}
for f in glob.glob(os.path.join(d, '*.log')):
    m = re.match(r'(.*)_(\d+)_([a-z0-9]+)$', os.path.basename(f)[:-4])
    if not m:
        continue
    shape, _, arm = m.groups()
    txt = open(f).read()

    def g(pat):
        mm = re.search(pat + r'\s+([\d.]+) ms\s+[\d.]+ MiB\s+[\d.]+ GB/s\s+(\d+)%', txt)
        return (float(mm.group(1)), int(mm.group(2))) if mm else None

    r = {'rel': g(r'relevancy scan \(digests\), wall'), 'sparse': g(r'sparse attention, wall'),
         'dense': g(r'dense attention, wall'), 'sparse reads': g(r"sparse attention's reads, wall"),
         'dense reads': g(r"dense attention's reads, wall")}
    mm = re.search(r'wall clock: ([\d.]+) GB/s', txt)
    r['read'] = (float(mm.group(1)), 0) if mm else None
    rows.setdefault(shape, {}).setdefault(arm, []).append(r)
for shape in sorted(rows):
    print('==', shape)
    for k in ['read', 'rel', 'sparse', 'dense', 'sparse reads', 'dense reads']:
        base = [x[k][0] for x in rows[shape].get(arms[0], []) if x[k]]
        out = []
        for a in arms:
            xs = [x[k] for x in rows[shape].get(a, []) if x[k]]
            if not xs:
                continue
            med = st.median(v for v, _ in xs)
            if k == 'read':
                out.append(f"{a}: {min(v for v, _ in xs):.1f}-{max(v for v, _ in xs):.1f} GB/s")
                continue
            pc = sorted(p for _, p in xs)
            rel = f" x{med / st.median(base):.2f}" if base else ""
            out.append(f"{a}: {med:.3f} ms{rel} [{pc[0]}-{pc[-1]}%]")
        print(f"  {k:13s}", ' | '.join(out))
