import re,sys,glob,collections,os
# logsum.py DIR: per (shape, threads, layout) over rounds: wall ms and % of the read
d=collections.defaultdict(list)
for f in sorted(glob.glob(os.path.join(sys.argv[1],'*.log'))):
    name=os.path.basename(f)[:-4]
    parts=name.split('_')
    r=parts[-1]; key='_'.join(parts[:-1])
    for line in open(f):
        m=re.match(r"\s+(sparse attention|dense attention|sparse attention's reads|dense attention's reads|sparse attention from cache), wall\s+([\d.]+) ms.*?(\d+)% \(",line)
        if m: d[(key,m.group(1))].append((float(m.group(2)),int(m.group(3))))
for k in sorted(d):
    v=d[k]; ms=sorted(x[0] for x in v); pc=sorted(x[1] for x in v)
    print(f"{k[0]:26s} {k[1]:28s} ms {ms[0]:.3f}-{ms[-1]:.3f}  % {pc[0]}-{pc[-1]}  (n={len(v)})")
