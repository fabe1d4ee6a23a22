"""_mempipe.append_kv_and_digests at SmolLM2's shape (3 KV heads of 64, page 32, head-major cache):
key/value as strided slices of a fused qkv, copied first (before d470408) or read in place."""
import time, statistics, torch
from mempipe import _mempipe
kvh,h,d,ps=3,9,64,32
T=1024
for dt in (torch.bfloat16, torch.float32):
    nb=4096
    base=torch.zeros(2,nb,kvh,ps,d,dtype=dt); kv=base.permute(0,1,3,2,4)
    dg=torch.zeros(nb,2,kvh,d,dtype=dt)
    slots=torch.arange(T,dtype=torch.int64)+64*ps
    qkv=torch.randn(T,(h+2*kvh)*d).to(dt)
    key=qkv[:,h*d:(h+kvh)*d].view(T,kvh,d); val=qkv[:,(h+kvh)*d:].view(T,kvh,d)
    kc,vc=key.contiguous(),val.contiguous()
    def t(f):
        f(); r=[]
        for _ in range(15):
            s=time.perf_counter(); [f() for _ in range(20)]; r.append((time.perf_counter()-s)/20*1e3)
        return statistics.median(r)
    try:
        print(dt, "append contiguous", t(lambda: _mempipe.append_kv_and_digests(kv,slots,kc,vc,dg)))
    except Exception as e: print("ERR", e); break
    print(dt, "write_kv contiguous", t(lambda: _mempipe.write_kv(kv,slots,kc,vc)))
    print(dt, "2x .contiguous()", t(lambda: (key.contiguous(), val.contiguous())))
print("--- strided in place vs .contiguous() then append (the old PagedLayer.append)")
for dt in (torch.bfloat16, torch.float32):
  for T in (1024, 4):
    nb=4096
    base=torch.zeros(2,nb,kvh,ps,d,dtype=dt); kv=base.permute(0,1,3,2,4)
    dg=torch.zeros(nb,2,kvh,d,dtype=dt)
    slots=torch.arange(T,dtype=torch.int64)+64*ps
    qkv=torch.randn(T,(h+2*kvh)*d).to(dt)
    key=qkv[:,h*d:(h+kvh)*d].view(T,kvh,d); val=qkv[:,(h+kvh)*d:].view(T,kvh,d)
    def t(f):
        f(); r=[]
        for _ in range(15):
            s=time.perf_counter(); [f() for _ in range(20)]; r.append((time.perf_counter()-s)/20*1e3)
        return statistics.median(r)
    a=t(lambda: _mempipe.append_kv_and_digests(kv,slots,key.contiguous(),val.contiguous(),dg))
    b=t(lambda: _mempipe.append_kv_and_digests(kv,slots,key,val,dg))
    print(f"{dt} {T} tokens: copy+append {a:.4f} ms, in place {b:.4f} ms")
