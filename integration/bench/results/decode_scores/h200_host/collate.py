import re,glob,collections,statistics as st,sys
res=collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1]+'/*.log')):
    m=re.match(r'(.*)_(kb_\w+?)_(\d)\.log',f.split('/')[-1])
    if not m: continue
    cfg,b,r=m.groups(); txt=open(f).read()
    sm=re.search(r'STREAM-like.*?: ([\d.]+) GB/s',txt)
    for kind in ('sparse','dense'):
        mm=re.search(kind+r' attention \(.*?\)\s+([\d.]+) ms\s+[\d.]+ MiB\s+([\d.]+) GB/s\s+(\d+)%',txt)
        if mm: res[(cfg,kind,b)].append((float(mm.group(2)),int(mm.group(3)),float(sm.group(1))))
keys=sorted(set((c,k) for c,k,b in res))
for c,k in keys:
    b=res.get((c,k,'kb_base'),[]); n=res.get((c,k,'kb_new'),[])
    if not b or not n: continue
    mb=st.median(x[0] for x in b); mn=st.median(x[0] for x in n)
    print(f"{c:18s} {k:6s} GB/s base {mb:6.1f} new {mn:6.1f} new/base time {mb/mn:.3f}  %base {[x[1] for x in b]} %new {[x[1] for x in n]}")
