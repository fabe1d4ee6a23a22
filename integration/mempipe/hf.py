"""mempipe as a Hugging Face transformers attention function, built on torch.ops.mempipe.*.

    import mempipe.hf
    mempipe.hf.register()                      # adds "mempipe" to transformers' registry
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mempipe")
    model.generate(ids, max_new_tokens=32)     # MEMPIPE_CONFIG sets budget, dense layers ...

transformers keeps its own contiguous cache and hands the attention function the whole context
(key/value [batch, kv_heads, context, head_dim]). The adapter pages that context into a
mempipe cache on every call, builds the page digests (step 1) and then runs steps 2-4 for a
one-token query (sparse layers) or causal attention otherwise. Re-paging costs a copy of the
context per layer and step: the adapter shows that a model outside vLLM computes with the same
operators, it is not a fast path (vLLM's backend keeps the paged cache and digests instead).

Supported: causal decoder attention without padding (attention_mask None or the plain causal
pattern), no dropout, head_dim 64/128/256, fp32/fp16/bf16, CPU tensors.
"""

from __future__ import annotations

import torch

import mempipe.ops  # noqa: F401  (registers torch.ops.mempipe)
from mempipe import config as mempipe_config

NAME = "mempipe"


def _is_plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    rows = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    allowed = torch.arange(kv_len).unsqueeze(0) <= rows  # [q_len, kv_len]
    if mask.dtype == torch.bool:
        seen = mask
    else:  # additive float mask: 0 keeps, a large negative value drops
        seen = mask > torch.finfo(mask.dtype).min / 2
    return bool((seen[..., :q_len, :kv_len] == allowed).all())


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, Sq, D]; key, value [B, KVH, Skv, D]. Returns ([B, Sq, H, D], None)."""
    if dropout:
        raise NotImplementedError(f"mempipe attention has no dropout, got {dropout}")
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        raise NotImplementedError("mempipe's transformers adapter supports causal attention "
                                  "without padding only")
    cfg = mempipe_config.load()
    reasons = cfg.validate()
    if reasons:
        raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    page = cfg.page_size
    pages_per_seq = -(-kv_len // page)

    # Page the context: sequence b owns blocks [b * pages_per_seq, (b + 1) * pages_per_seq).
    kv_cache = torch.full((2, batch * pages_per_seq, page, kv_heads, head_dim), float("nan"),
                          dtype=key.dtype)
    digests = torch.empty(batch * pages_per_seq, 2, kv_heads, head_dim, dtype=key.dtype)
    block_table = torch.arange(batch * pages_per_seq, dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32)
    slots = (torch.arange(batch).unsqueeze(1) * pages_per_seq * page
             + torch.arange(kv_len).unsqueeze(0)).flatten()
    rows = lambda t: t.transpose(1, 2).reshape(batch * kv_len, kv_heads, head_dim)  # noqa: E731
    torch.ops.mempipe.write_kv(kv_cache, slots, rows(key), rows(value))

    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    layer = getattr(module, "layer_idx", 0)
    if q_len == 1 and cfg.layer_sparse(layer):
        torch.ops.mempipe.build_digests(kv_cache, block_table, seq_lens, digests)
        pages, counts = torch.ops.mempipe.score_and_select(
            q, kv_cache, digests, block_table, seq_lens, cfg.budget, cfg.sinks, cfg.locals,
            cfg.aggregation)
        out = torch.ops.mempipe.sparse_decode(q, kv_cache, block_table, seq_lens, pages, counts,
                                              scale)
    else:
        starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
        out = torch.ops.mempipe.prefill_attention(q, starts, kv_cache, block_table, seq_lens,
                                                  scale)
    return out.view(batch, q_len, num_heads, head_dim), None


def register() -> None:
    """Adds `attn_implementation="mempipe"` to transformers (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attention_forward)
    try:  # transformers builds masks per implementation; mempipe reads the causal (sdpa) form
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:
        pass
