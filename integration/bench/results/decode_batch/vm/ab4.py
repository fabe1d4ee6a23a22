import subprocess, sys, statistics, re, json
# ab4.py binaryA binaryB reps common...: the two binaries alternated, same arguments
bA=sys.argv[1]; bB=sys.argv[2]; reps=int(sys.argv[3]); common=sys.argv[4:]
def run(b):
    out=subprocess.run([b,"--passes=5"]+common,capture_output=True,text=True).stdout
    r={}
    for line in out.splitlines():
        m=re.match(r"\s+(sparse|dense) attention( \(|'s reads)\S*.*?\s([\d.]+) ms.*?([\d.]+) GB/s\s+(\d+)%",line)
        if m:
            k=m.group(1)+("" if "(" in m.group(2) else "-rows"); r[k]=float(m.group(3)); r[k+"%"]=int(m.group(5))
        m=re.search(r"per-thread CPU time: ([\d.]+) GB/s",line)
        if m: r["read"]=float(m.group(1))
    return r
ratios={}; allr=[]
for i in range(reps):
    x=run(bA); y=run(bB); allr.append((x,y))
    print("A",x,"\nB",y,flush=True)
    for k in x:
        if k!="read" and not k.endswith("%"): ratios.setdefault(k,[]).append(y[k]/x[k])
for k,v in ratios.items(): print(f"{k}: B/A median {statistics.median(v):.3f} range {min(v):.3f}-{max(v):.3f}")
for side,idx in (("A",0),("B",1)):
    for k in ("sparse%","dense%"):
        vals=[r[idx][k] for r in allr]; print(f"{side} {k}: {min(vals)}-{max(vals)} (median {statistics.median(vals)})")
