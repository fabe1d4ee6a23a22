"""_mempipe.append_kv_and_digests at SmolLM2's shape (3 KV heads of 64, page 32, head-major cache):
key/value as strided slices of a fused qkv, copied first (before d470408) or read in place.

    python append_rows_probe.py      (median ms of 15 rounds of 20 calls)
"""
import statistics
import time

import torch

from mempipe import _mempipe

KVH, H, D, PS, NB = 3, 9, 64, 32, 4096


def setup(dt, tokens):
    """A head-major cache, its digests, slots past block 64, and vLLM-style strided key/value."""
    kv = torch.zeros(2, NB, KVH, PS, D, dtype=dt).permute(0, 1, 3, 2, 4)
    dg = torch.zeros(NB, 2, KVH, D, dtype=dt)
    slots = torch.arange(tokens, dtype=torch.int64) + 64 * PS
    qkv = torch.randn(tokens, (H + 2 * KVH) * D).to(dt)
    key = qkv[:, H * D:(H + KVH) * D].view(tokens, KVH, D)
    val = qkv[:, (H + KVH) * D:].view(tokens, KVH, D)
    return kv, dg, slots, key, val


def timed(f):
    f()
    rounds = []
    for _ in range(15):
        s = time.perf_counter()
        for _ in range(20):
            f()
        rounds.append((time.perf_counter() - s) / 20 * 1e3)
    return statistics.median(rounds)


for dt in (torch.bfloat16, torch.float32):
    kv, dg, slots, key, val = setup(dt, 1024)
    kc, vc = key.contiguous(), val.contiguous()
    print(dt, "append contiguous",
          timed(lambda: _mempipe.append_kv_and_digests(kv, slots, kc, vc, dg)))
    print(dt, "write_kv contiguous", timed(lambda: _mempipe.write_kv(kv, slots, kc, vc)))
    print(dt, "2x .contiguous()", timed(lambda: (key.contiguous(), val.contiguous())))
print("--- strided in place vs .contiguous() then append (the old PagedLayer.append)")
for dt in (torch.bfloat16, torch.float32):
    for tokens in (1024, 4):
        kv, dg, slots, key, val = setup(dt, tokens)
        a = timed(lambda: _mempipe.append_kv_and_digests(kv, slots, key.contiguous(),
                                                         val.contiguous(), dg))
        b = timed(lambda: _mempipe.append_kv_and_digests(kv, slots, key, val, dg))
        print(f"{dt} {tokens} tokens: copy+append {a:.4f} ms, in place {b:.4f} ms")
