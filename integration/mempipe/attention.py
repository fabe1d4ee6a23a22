"""One layer of mempipe attention over a paged KV cache, framework-neutral (torch tensors).

The vLLM backend (mempipe.vllm.backend) and the transformers adapter (mempipe.hf) both drive
this class; it holds the layer's digests and runs, per call:

    append  keys/values into the cache and widen the page digests       (step 1, incremental)
    decode  for one-token queries: score pages (2), select top-k (3), attend to them (4);
            dense attention when the layer is dense or the placement is `dense`
    prefill causal attention over the cache for multi-token queries (always dense)

    layer = PagedLayer(config, layer_index=5, num_heads=32, num_kv_heads=8, head_dim=128,
                       scale=128 ** -0.5)
    layer.append(kv_cache, slot_mapping, key, value)
    layer.decode(query, kv_cache, block_table, seq_lens, out)

Tensors (CPU, contiguous):
    kv_cache     [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping [T] int64;  key, value [T, num_kv_heads, head_dim]
    block_table  [S, max_blocks] int32;  seq_lens [S] int32
    query, out   [S, num_heads, head_dim] (decode) or [T, num_heads, head_dim] (prefill)
"""

from __future__ import annotations

import torch

from mempipe import _mempipe
from mempipe.config import MempipeConfig


class PagedLayer:
    def __init__(self, config: MempipeConfig, layer_index: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, scale: float):
        reasons = config.validate()
        if reasons:
            raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
        self.config = config
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = float(scale)
        self.sparse = config.layer_sparse(layer_index)
        # Attention (step 4) shares (sequence, KV head) pairs among as many host threads as
        # torch uses, which vLLM's CPU worker sets to the cores it binds.
        self.num_threads = max(1, torch.get_num_threads())
        self._digests: torch.Tensor | None = None
        self._digests_key: tuple | None = None
        # A layer that reads another layer's KV cache (vLLM's kv_sharing_target_layer_name)
        # scores with that layer's digests; the target keeps digests even when it is dense.
        self.digest_source: PagedLayer | None = None
        self.keep_digests = False

    def digests(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The digests of `kv_cache`, [num_blocks, 2, num_kv_heads, head_dim] in its dtype.

        Allocated on first use and kept for the cache's lifetime (a new cache tensor, e.g.
        after vLLM re-allocates, gets new digests). Unwritten pages hold NaN: a page is only
        scored after a token was appended to it, which resets its digest first.
        """
        if self.digest_source is not None:
            return self.digest_source.digests(kv_cache)
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype)
        if self._digests is None or self._digests_key != key:
            _, num_blocks, _, kv_heads, head_dim = kv_cache.shape
            self._digests = torch.full((num_blocks, 2, kv_heads, head_dim), float("nan"),
                                       dtype=kv_cache.dtype, device=kv_cache.device)
            self._digests_key = key
        return self._digests

    def append(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> None:
        """Writes the new tokens and keeps the digests current (only sparse layers need them)."""
        key, value = key.contiguous(), value.contiguous()
        if self.sparse or self.keep_digests:
            _mempipe.append_kv_and_digests(kv_cache, slot_mapping, key, value,
                                           self.digests(kv_cache))
        else:
            _mempipe.write_kv(kv_cache, slot_mapping, key, value)

    def decode(self, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, out: torch.Tensor) -> None:
        """One query token per sequence: sparse (steps 2-4) or dense. Writes `out`."""
        query = query.contiguous()
        if not self.sparse:
            _mempipe.dense_decode(query, kv_cache, block_table, seq_lens, out, self.scale,
                                  num_threads=self.num_threads)
            return
        c = self.config
        pages = torch.empty(block_table.shape[0], self.num_kv_heads, c.budget // c.page_size,
                            dtype=torch.int32)
        counts = torch.empty(block_table.shape[0], self.num_kv_heads, dtype=torch.int32)
        _mempipe.score_and_select(query, kv_cache, self.digests(kv_cache), block_table, seq_lens,
                                  pages, counts, budget=c.budget, sinks=c.sinks,
                                  locals=c.locals, aggregation=c.aggregation)
        _mempipe.sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out,
                               self.scale, num_threads=self.num_threads)

    def prefill(self, query: torch.Tensor, query_start_loc: torch.Tensor,
                kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                out: torch.Tensor) -> None:
        """Causal attention of each sequence's new tokens over its cache (dense)."""
        _mempipe.prefill_attention(query.contiguous(), query_start_loc, kv_cache, block_table,
                                   seq_lens, out, self.scale, num_threads=self.num_threads)
