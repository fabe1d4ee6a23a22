import re,sys,collections,statistics as st
res=collections.defaultdict(list); cur=None
for l in open(sys.argv[1]):
    if l.startswith('=='): _,b,c=l.split(); cur=(c,b.split('/')[-1]); continue
    m=re.match(r'\s+(sparse|dense) attention \(.*?\)\s+([\d.]+) ms.*?(\d+)%',l)
    if m: res[(cur[0],m.group(1),cur[1])].append((float(m.group(2)),int(m.group(3))))
base=None
for k in sorted(res):
    v=res[k]; med=st.median(t for t,_ in v)
    print(f"{k[0]:10s} {k[1]:6s} {k[2]:12s} med {med:.3f}  " + " ".join(f"{t:.3f}({p})" for t,p in v))
