"""Per-call time of the bindings at one Llama-3-8B-shaped layer (32 query / 8 KV heads, head_dim
128, bf16), one sequence of 32K tokens, page 16, budget 4096: dense decode vs score+select+
sparse decode, CPU. Measured on the machine that runs it, which it names."""
import os
import platform
import time

import torch

from mempipe import _mempipe as mp
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
      f"torch {torch.__version__}")
torch.manual_seed(0)
L, bs, kvh, h, d, budget = 32768, 16, 8, 32, 128, 4096
nb = L // bs
kv = torch.randn(2, nb, bs, kvh, d).to(torch.bfloat16)
bt = torch.arange(nb, dtype=torch.int32).view(1, -1); sl = torch.tensor([L], dtype=torch.int32)
dg = torch.empty(nb, 2, kvh, d, dtype=torch.bfloat16); mp.build_digests(kv, bt, sl, dg)
q = torch.randn(1, h, d).to(torch.bfloat16); out = torch.empty_like(q)
pages = torch.empty(1, kvh, budget // bs, dtype=torch.int32); counts = torch.empty(1, kvh, dtype=torch.int32)
def t(f, n=5):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e3
for th in (1, 2):
    dense = t(lambda: mp.dense_decode(q, kv, bt, sl, out, d ** -0.5, num_threads=th))
    sel = t(lambda: mp.score_and_select(q, kv, dg, bt, sl, pages, counts, budget=budget))
    sp = t(lambda: mp.sparse_decode(q, kv, bt, sl, pages, counts, out, d ** -0.5, num_threads=th))
    print(f"threads={th}: dense {dense:.2f} ms | score+select {sel:.2f} ms + sparse {sp:.2f} ms = {sel+sp:.2f} ms")
