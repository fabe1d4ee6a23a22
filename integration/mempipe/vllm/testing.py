"""Helpers for driving the backend outside vLLM's engine (tests and benches).

    from mempipe.vllm.testing import common_metadata
    meta = builder.build(0, common_metadata(block_table, seq_lens, query_lens, block_size))
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata


def common_metadata(block_table: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                    block_size: int, max_query_len: int | None = None) -> CommonAttentionMetadata:
    """CommonAttentionMetadata as vLLM's model runner fills it on the CPU: request i has
    seq_lens[i] tokens of which the last query_lens[i] are new, its pages in block_table's row i
    (passed as is); slots follow from the positions. max_query_len: an upper bound other than
    the exact one (vLLM may pass one)."""
    n = len(seq_lens)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens)])
    req = torch.repeat_interleave(torch.arange(n), torch.tensor(query_lens))
    slots = block_table[req, positions // block_size].long() * block_size + positions % block_size
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=n,
        num_actual_tokens=int(qsl[-1]), max_query_len=max_query_len or max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=block_table, slot_mapping=slots,
        causal=True, positions=positions)
