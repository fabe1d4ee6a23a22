"""Plain references for the four steps (numpy / float64 torch), and random paged batches.

Every test draws fresh data from a generator seeded per run (conftest.py prints the seed).
The cache starts as NaN: a kernel that reads a slot no token was written to shows it as NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Output tolerance (absolute, on O(1) values) per storage dtype: the kernels compute in fp32
# and round the output once to the storage dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class PagedBatch:
    kv_cache: torch.Tensor     # [2, num_blocks, block_size, kv_heads, head_dim]
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor     # [S] int32
    keys: list                 # per sequence [len, kv_heads, head_dim] (cache dtype)
    values: list
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()


def slots_for(block_table: torch.Tensor, seq: int, positions, block_size: int) -> torch.Tensor:
    pos = torch.as_tensor(positions, dtype=torch.int64)
    return block_table[seq, pos // block_size].to(torch.int64) * block_size + pos % block_size


def random_batch(gen: torch.Generator, dtype: torch.dtype, block_size: int, kv_heads: int,
                 head_dim: int, seq_lens: list[int], spare_blocks: int = 3,
                 write=None, layout: str = "token") -> PagedBatch:
    """Sequences of the given lengths in shuffled physical blocks, written through `write`
    (default: the module's write_kv) one sequence at a time. layout "token": kv_cache is
    C-contiguous [2, blocks, block_size, KVH, D]; "head" and "page": the same logical tensor as a
    view of head-major memory [2, blocks, KVH, block_size, D] or page-major memory [blocks, KVH,
    2, block_size, D] (what the vLLM backend gives host caches; mempipe.attention.layout_view)."""
    from mempipe import _mempipe
    from mempipe.attention import poisoned_cache
    write = write or _mempipe.write_kv
    pages = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(pages) + 1  # a spare column: entries past a sequence are never read
    num_blocks = sum(pages) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.full((len(seq_lens), max_blocks), -7, dtype=torch.int32)
    used = 0
    for s, p in enumerate(pages):
        block_table[s, :p] = perm[used:used + p]
        used += p
    kv_cache = poisoned_cache(num_blocks, block_size, kv_heads, head_dim, dtype, "cpu", layout)
    keys, values = [], []
    for s, n in enumerate(seq_lens):
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        write(kv_cache, slots_for(block_table, s, range(n), block_size), k, v)
        keys.append(k)
        values.append(v)
    return PagedBatch(kv_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), keys,
                      values, block_size)


def ref_digests(batch: PagedBatch) -> dict[int, torch.Tensor]:
    """{physical block: [2, kv_heads, head_dim] (max, min)} for every used page."""
    out = {}
    bs = batch.block_size
    for s, n in enumerate(batch.seq_lens.tolist()):
        for p in range(-(-n // bs)):
            keys = batch.keys[s][p * bs:min(n, (p + 1) * bs)]
            out[int(batch.block_table[s, p])] = torch.stack([keys.amax(0), keys.amin(0)])
    return out


def page_bound(q: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The Quest bound in the canonical fp32 order (retriever/relevancy.h), for pages [P, D]:
    lane c % 32 adds its terms in increasing c, then lanes fold 16, 8, 4, 2, 1."""
    q, mx, mn = (np.asarray(a, dtype=np.float32) for a in (q, mx, mn))
    terms = np.maximum(q * mx, q * mn)  # [P, D], each product rounded to fp32
    lanes = np.zeros((terms.shape[0], 32), dtype=np.float32)
    for c in range(terms.shape[1]):
        lanes[:, c % 32] = lanes[:, c % 32] + terms[:, c]
    for step in (16, 8, 4, 2, 1):
        lanes[:, :step] = lanes[:, :step] + lanes[:, step:2 * step]
    return lanes[:, 0]


def ref_scores(query: torch.Tensor, batch: PagedBatch, digests: torch.Tensor,
               aggregation: str) -> np.ndarray:
    """[S, kv_heads, max_blocks] fp32, -inf past each sequence's last page."""
    num_heads = query.shape[1]
    kv_heads = batch.kv_cache.shape[3]
    group = num_heads // kv_heads
    max_blocks = batch.block_table.shape[1]
    out = np.full((batch.num_seqs, kv_heads, max_blocks), -np.inf, dtype=np.float32)
    dg = digests.float().numpy()
    q = query.float().numpy()
    for s, n in enumerate(batch.seq_lens.tolist()):
        blocks = batch.block_table[s, :-(-n // batch.block_size)].long().numpy()
        for g in range(kv_heads):
            acc = None
            for h in range(g * group, (g + 1) * group):
                b = page_bound(q[s, h][None, :], dg[blocks, 0, g], dg[blocks, 1, g])
                if acc is None:
                    acc = b
                elif aggregation == "max":
                    acc = np.maximum(acc, b)
                else:
                    acc = (acc + b).astype(np.float32)
            out[s, g, :len(blocks)] = acc
    return out


def ref_select(scores: np.ndarray, seq_lens, block_size: int, budget: int, sinks: int,
               locals_: int) -> list[list[list[int]]]:
    """Selected logical pages per (sequence, kv head), ascending."""
    k = budget // block_size
    out = []
    for s, n_tok in enumerate(seq_lens):
        n = -(-int(n_tok) // block_size)
        rows = []
        for h in range(scores.shape[1]):
            if n <= k:
                rows.append(list(range(n)))
                continue
            keep = set(range(sinks)) | set(range(n - locals_, n))
            middle = sorted(range(sinks, n - locals_), key=lambda p: (-scores[s, h, p], p))
            keep |= set(middle[:k - len(keep)])
            rows.append(sorted(keep))
        out.append(rows)
    return out


def ref_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scale: float) -> torch.Tensor:
    """One query [D] over keys/values [L, D], float64."""
    w = torch.softmax((keys.double() @ q.double()) * scale, dim=0)
    return w @ values.double()


def ref_decode(query: torch.Tensor, batch: PagedBatch, scale: float,
               pages=None) -> torch.Tensor:
    """[S, H, D] float64; `pages[s][g]` restricts KV head g of sequence s to those pages."""
    num_heads = query.shape[1]
    kv_heads = batch.kv_cache.shape[3]
    group = num_heads // kv_heads
    out = torch.empty(query.shape, dtype=torch.float64)
    bs = batch.block_size
    for s, n in enumerate(batch.seq_lens.tolist()):
        for h in range(num_heads):
            g = h // group
            if pages is None:
                idx = torch.arange(n)
            else:
                idx = torch.cat([torch.arange(p * bs, min(n, (p + 1) * bs)) for p in pages[s][g]])
            out[s, h] = ref_attend(query[s, h], batch.keys[s][idx, g], batch.values[s][idx, g],
                                   scale)
    return out


def ref_prefill(query: torch.Tensor, query_start_loc: torch.Tensor, batch: PagedBatch,
                scale: float) -> torch.Tensor:
    num_heads = query.shape[1]
    group = num_heads // batch.kv_cache.shape[3]
    out = torch.empty(query.shape, dtype=torch.float64)
    for s, n in enumerate(batch.seq_lens.tolist()):
        t0, t1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        for i, t in enumerate(range(t0, t1)):
            pos = n - (t1 - t0) + i
            for h in range(num_heads):
                g = h // group
                out[t, h] = ref_attend(query[t, h], batch.keys[s][:pos + 1, g],
                                       batch.values[s][:pos + 1, g], scale)
    return out
