"""Median ms per layer and the range of % of the read, per shape and arm, from
mempipe-cpu-kernel-bench logs named <shape>_<rep>_<arm>.log; x = median against the first arm.
Usage: python3 collate.py DIR [FIRST_ARM]"""
import re,sys,glob,os,statistics as st
d=sys.argv[1]; base=sys.argv[2] if len(sys.argv)>2 else 'base'
rows={}
for f in glob.glob(d+'/*.log'):
    n=os.path.basename(f)[:-4]
    m=re.match(r'(.*)_(\d+)_(\w+)$',n)
    if not m: continue
    shape,rep,arm=m.groups()
    txt=open(f).read()
    def g(pat):
        mm=re.search(pat+r'\s+([\d.]+) ms\s+[\d.]+ MiB\s+[\d.]+ GB/s\s+(\d+)%',txt)
        return (float(mm.group(1)),int(mm.group(2))) if mm else (None,None)
    r={}
    r['sc']=g(r'sparse attention \(selected K/V\)'); r['dc']=g(r'dense attention \(all K/V\)')
    r['sw']=g(r'sparse attention, wall'); r['dw']=g(r'dense attention, wall')
    r['srw']=g(r"sparse attention's reads, wall"); r['drw']=g(r"dense attention's reads, wall")
    rows.setdefault(shape,{}).setdefault(arm,[]).append(r)
order=['base','spin','spinp','spin0','exp']
arms=sorted({a for r in rows.values() for a in r}, key=lambda a:(order.index(a) if a in order else 99, a))
for shape in sorted(rows):
    print('==',shape)
    for k,lab in [('sw','sparse wall'),('dw','dense wall'),('sc','sparse cpu'),('dc','dense cpu'),('srw','sparse reads wall')]:
        bm=st.median([x[k][0] for x in rows[shape].get(base,[]) if x[k][0]]) if rows[shape].get(base) else None
        out=[]
        for a in arms:
            xs=[x[k] for x in rows[shape].get(a,[]) if x[k][0]]
            if not xs: continue
            med=st.median([x[0] for x in xs]); pc=sorted(x[1] for x in xs)
            out.append(f"{a}: {med:.3f} ms x{med/bm:.2f} [{pc[0]}-{pc[-1]}%]")
        print(f"  {lab:18s}", ' | '.join(out))
