import re,glob,collections,statistics as st,sys
res=collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1]+'/*.log')):
    m=re.match(r'(.*)_(kb_\w+?)_(\d)\.log',f.split('/')[-1])
    if not m: continue
    cfg,b,r=m.groups(); txt=open(f).read()
    for kind in ('sparse','dense'):
        mm=re.search(kind+r' attention \(.*?\)\s+([\d.]+) ms\s+[\d.]+ MiB\s+([\d.]+) GB/s\s+(\d+)%',txt)
        if mm: res[(cfg,kind,b)].append((int(r),float(mm.group(2)),int(mm.group(3))))
bins=sys.argv[2].split(',')
cfgs=sorted(set(c for c,k,b in res))
for cfg in cfgs:
  for kind in ['sparse','dense']:
    if (cfg,kind,bins[0]) not in res: continue
    h=st.median(x[1] for x in res[(cfg,kind,bins[0])])
    out=[]
    for b in bins:
        v=sorted(res[(cfg,kind,b)])
        out.append(f"{b[3:]} x{h/st.median(x[1] for x in v):.3f} GB/s {'/'.join(f'{x[1]:.0f}' for x in v)} %{'/'.join(str(x[2]) for x in v)}")
    print(f"{cfg:15s} {kind:6s} | "+" | ".join(out))
