"""Causal prefill attention for the vLLM backend on the CPU: torch SDPA over gathered pages.

Prefill and chunked-prefill tokens are dense causal attention; torch's CPU
scaled_dot_product_attention (its blocked flash kernel) is the fastest CPU kernel for them that
accepts mempipe's cache once a request's pages are gathered into contiguous K and V: the gather
is O(seq_len), the attention O(q_len x seq_len). Measured against mempipe's own
`_mempipe.prefill_attention` by integration/bench/cpu_prefill_bench.py.

    gathered_sdpa_prefill(query, query_start_loc, kv_cache, block_table, seq_lens, out, scale)

Tensors (CPU): query, out [T, H, D]; query_start_loc [S + 1] int32; kv_cache
[2, num_blocks, block_size, KVH, D]; block_table [S, max_blocks] int32; seq_lens [S] int32.
The last q_len(s) tokens of sequence s attend to cached tokens [0, position] (the cache must
already hold them), as in `_mempipe.prefill_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def gathered_sdpa_prefill(query: torch.Tensor, query_start_loc: torch.Tensor,
                          kv_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    heads = query.shape[1]
    if heads % kv_heads or query.shape[2] != head_dim:
        raise ValueError(f"query shape {tuple(query.shape)} does not fit {kv_heads} KV heads of "
                         f"size {head_dim}")
    groups = heads // kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, length in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        if not 0 < q_len <= length:
            raise ValueError(f"sequence {s} has {q_len} query tokens but seq_len {length}")
        pages = (length + block_size - 1) // block_size
        blocks = block_table[s, :pages].to(torch.int64)
        # [pages, block, KVH, D] -> [KVH, seq_len, D], then one copy per query head group.
        k = kv_cache[0].index_select(0, blocks).view(-1, kv_heads, head_dim)[:length]
        v = kv_cache[1].index_select(0, blocks).view(-1, kv_heads, head_dim)[:length]
        # torch's CPU flash kernel takes 4-D [batch, heads, tokens, dim] only (3-D inputs fall
        # back to the math kernel, 5-7x slower for a 6K prompt).
        k = k.transpose(0, 1).unsqueeze(0)
        v = v.transpose(0, 1).unsqueeze(0)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        q = query[q0:q1].transpose(0, 1).unsqueeze(0)
        if q_len == length:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # chunked prefill: the new tokens are the last q_len positions
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, length),
                                               scale=scale)
        out[q0:q1].copy_(o[0].transpose(0, 1))
