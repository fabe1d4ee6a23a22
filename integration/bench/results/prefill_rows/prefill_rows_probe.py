"""VllmCpuPrefill.run at SmolLM2's shape, 4 x L whole prompts: rows given vs gathered; strided q."""
import sys, time, statistics, torch
from mempipe.vllm.prefill import VllmCpuPrefill
kvh, h, d, ps = 3, 9, 64, 32
L = int(sys.argv[1]) if len(sys.argv) > 1 else 256
for dt in (torch.bfloat16, torch.float32):
    torch.manual_seed(0)
    per = -(-L // ps); nb = 4 * per + 4
    kv = torch.randn(2, nb, ps, kvh, d).to(dt)
    table = torch.arange(4 * per, dtype=torch.int32).view(4, per)
    sl = torch.full((4,), L, dtype=torch.int32)
    qsl = torch.arange(0, 5 * L, L, dtype=torch.int32)
    T = 4 * L
    qkv = torch.randn(T, (h + 2 * kvh) * d).to(dt)
    q = qkv[:, :h * d].view(T, h, d)
    key = qkv[:, h * d:(h + kvh) * d].view(T, kvh, d)
    val = qkv[:, (h + kvh) * d:].view(T, kvh, d)
    out = torch.empty(T, h, d, dtype=dt)
    pf = VllmCpuPrefill(h, kvh, d, dt, ps)
    plan = pf.plan(qsl, table, sl)
    cases = {"gather, q copied": lambda: pf.run(plan, q.contiguous(), kv, out, 0.125),
             "rows, q copied": lambda: pf.run(plan, q.contiguous(), kv, out, 0.125, key, val),
             "rows, q strided": lambda: pf.run(plan, q, kv, out, 0.125, key, val)}
    res = {k: [] for k in cases}
    for f in cases.values(): f()
    for _ in range(15):
        for k, f in cases.items():
            s = time.perf_counter(); [f() for _ in range(10)]; res[k].append((time.perf_counter() - s) / 10 * 1e3)
    print(f"{dt} 4 x {L}, {torch.get_num_threads()} threads, ms per layer call, median (min) of 15 x 10:")
    for k, v in res.items():
        print(f"  {k:18s} {statistics.median(v):.3f} ({min(v):.3f})")
