"""mempipe as a Hugging Face transformers attention function, with a paged cache.

    import mempipe.hf
    mempipe.hf.register()                      # adds "mempipe" to transformers' registry
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mempipe")
    cache = mempipe.hf.MempipeCache()          # pages + digests kept across steps
    model.generate(ids, max_new_tokens=32, past_key_values=cache)

With a MempipeCache (transformers' `Cache` interface), each layer's keys and values live in
mempipe pages ([2, num_blocks, page, kv_heads, head_dim], sequence b's page j in block
j * batch + b) with their digests: `update` appends only the new tokens (one fused append +
digest kernel per decode step; a prompt is written with one index_copy and its digests built
in bulk) and the attention function reads the pages: steps 2-4 for a one-token query on
sparse layers, dense paged decode on the others, causal prefill otherwise (CUDA: transformers' own SDPA
function over the contiguous prompt, or torch SDPA over the gathered pages when the cache
already holds a prefix; CPU: mempipe's prefill kernel). Capacity grows by doubling (block ids are kept), so a step
costs the kernels' time, not a copy of the context. Decode runs without host synchronization
on CUDA; the scratch buffers come from the cache's DecodePlan (allocated once).

Without a MempipeCache (e.g. transformers' own DynamicCache, or no cache) the function falls
back to paging the whole context it is handed on every call: correct, but a copy of the
context per layer and step.

Schemes (mempipe.config) need a MempipeCache: `MempipeCache(MempipeConfig(placement="fpga",
reuse=4))` runs steps 1-3 on the selection-offload engine (the cache's DecodePlan owns one per
model; the sparse layers' prompt digests are built on the card in bulk and every decode step's
new keys appended there), and pipelined / reuse / lookahead on every placement. Without a
MempipeCache they are refused (they keep state across steps and layers).

Look-ahead (`lookahead=true`) with `lookahead_query=projected` (the default) scores layer L+1's
digests with layer L+1's query *speculated* while layer L runs: forward pre-hooks on the decoder
layers keep the residual stream entering each layer (and its RoPE cos/sin), and at layer L's
decode the adapter applies layer L+1's input RMSNorm, q_proj (and q_norm where the model has
one) and RoPE to it. The cache needs the model for that: `MempipeCache(config, model=model)`
(`speculated_query` is the computation; one [hidden x heads*head_dim] GEMV per layer).

Supported: causal decoder attention without padding (attention_mask None or the plain causal
pattern), no dropout, head_dim 64/128/256, fp32/fp16/bf16, CPU or CUDA tensors.
"""

from __future__ import annotations

import threading

import torch

import mempipe.ops  # noqa: F401  (registers torch.ops.mempipe)
from mempipe import config as mempipe_config
from mempipe import digests as digest_store
import mempipe
from mempipe import _mempipe
from mempipe.attention import DecodePlan, PagedLayer, gather_context, poisoned_cache, sdpa_causal

NAME = "mempipe"

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers absent or too old: the fallback path still works
    Cache, CacheLayerMixin = object, object

# The layer whose update() ran last on this thread: transformers calls the attention function
# right after `past_key_values.update(...)` of the same layer, without passing the cache.
_pending = threading.local()


class MempipePagedLayer(CacheLayerMixin):
    """One decoder layer's paged K/V and digests (transformers' CacheLayerMixin)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: MempipeCache | None = None, **kwargs):
        super().__init__()
        self.cache = cache
        self.length = 0          # tokens held per sequence (no padding: all equal)
        self.capacity = 0        # pages per sequence
        self.kv_cache = None     # [2, batch * capacity, page, kv_heads, head_dim] (poisoned_cache)
        # [batch * capacity, 2, kv_heads, head_dim] in the cache dtype, or an Int8Digests
        # (config digest_dtype=int8; mempipe.digests)
        self.digests = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.batch, self.kv_heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.page = self.cache.config.page_size
        self.is_initialized = True

    def _grow(self, length: int) -> None:
        need = -(-length // self.page)
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 16)
        b = self.batch
        kv = poisoned_cache(b * cap, self.page, self.kv_heads, self.head_dim, self.dtype,
                            self.device, self.cache.config.kv_layout)
        dg = digest_store.empty(b * cap, self.kv_heads, self.head_dim, self.dtype, self.device,
                                self.cache.config.digest_dtype)
        if self.kv_cache is not None:  # block ids j * batch + b are kept
            kv[:, :self.kv_cache.shape[1]] = self.kv_cache
            dg[:self.digests.shape[0]] = self.digests
        self.kv_cache, self.digests, self.capacity = kv, dg, cap
        self.block_table = (torch.arange(cap, dtype=torch.int32, device=self.device)
                            .unsqueeze(0) * b
                            + torch.arange(b, dtype=torch.int32, device=self.device)
                            .unsqueeze(1)).contiguous()

    def slots(self, start: int, n: int) -> torch.Tensor:
        """Slot of token start..start+n-1 of every sequence, [batch * n] int64, batch-major."""
        pos = torch.arange(start, start + n, device=self.device)
        b = torch.arange(self.batch, device=self.device).unsqueeze(1)
        return (((pos // self.page) * self.batch + b) * self.page + pos % self.page).flatten()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        start = self.length
        cfg = self.cache.config
        # Look-ahead scores the next layer's pages before that layer's update() of this step:
        # capacity one token ahead, so its cache already holds this step's page.
        self._grow(start + n + (1 if cfg.lookahead else 0))
        rows = lambda t: t.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)  # noqa
        slots = self.slots(start, n)
        if n == 1:  # one fused append + digest update (every layer: dense ones never read it)
            mempipe.steps.append_kv_and_digests(self.kv_cache, slots, rows(key_states).contiguous(),
                                                rows(value_states).contiguous(), self.digests)
        else:  # a prompt: one write, then the touched pages' digests in bulk
            if not self.kv_cache.is_contiguous():  # a head-major host cache (poisoned_cache)
                _mempipe.write_kv(self.kv_cache, slots, rows(key_states).contiguous(),
                                  rows(value_states).contiguous())
            else:
                for plane, t in ((0, key_states), (1, value_states)):
                    self.kv_cache[plane].view(-1, self.kv_heads, self.head_dim).index_copy_(
                        0, slots, rows(t))
            lens = torch.full((self.batch,), start + n, dtype=torch.int32, device=self.device)
            mempipe.ops.build_digests_any(self.kv_cache, self.block_table, lens, self.digests)
        self.length = start + n
        if cfg.placement == "fpga":
            self._to_card(slots, rows(key_states), n)
        _pending.state = (self, key_states, start)
        return key_states, value_states

    def _to_card(self, slots, keys, n) -> None:
        """Placement fpga: the new keys of a sparse layer to the card (one token: the engine's
        append; a prompt, or a cache that was just re-allocated: its digests in bulk)."""
        cfg, plan = self.cache.config, self.cache.plan
        idx = self.cache.layers.index(self)
        if not cfg.layer_sparse(idx):
            return
        card_id, new = plan.card_layer(cfg, idx, self.kv_cache)
        off = plan.offload(cfg, self.device)
        if n == 1 and not new:
            off.append(card_id, slots, keys.contiguous())
            return
        lens = torch.full((self.batch,), self.length, dtype=torch.int32, device=self.device)
        off.build_digests(card_id, self.kv_cache, self.block_table, lens)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        if self.digests is not None:
            digest_store.poison_(self.digests)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the ModuleList whose every entry has `self_attn` (with a
    `q_proj`) and `input_layernorm` (Llama, Mistral, Qwen2/3, ... layouts). ValueError naming
    the model's class where there is none."""
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and all(
                hasattr(x, "self_attn") and hasattr(x, "input_layernorm")
                and hasattr(x.self_attn, "q_proj") for x in m):
            return m
    raise ValueError(f"mempipe lookahead_query=projected: {type(model).__name__} has no list of "
                     "decoder layers with self_attn.q_proj and input_layernorm (the Llama "
                     "layout); use lookahead_query=same")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def speculated_query(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """`layer`'s query computed from `hidden` [B, n, hidden] (the residual stream entering the
    layer before it): its input RMSNorm, q_proj, q_norm (where the model has one) and RoPE
    with `cos`, `sin` [B, n, head_dim] (rotate-half convention). Returns [B * n, heads, D],
    the layout PagedLayer.decode takes."""
    attn = layer.self_attn
    b, n, _ = hidden.shape
    q = attn.q_proj(layer.input_layernorm(hidden)).view(b, n, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norm
        q = attn.q_norm(q)
    c, s_ = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, n, 1, D]: broadcast over the heads
    q = q * c + _rotate_half(q) * s_
    return q.reshape(b * n, q.shape[2], attn.head_dim)


class _Speculator:
    """lookahead_query=projected: forward pre-hooks on the model's decoder layers keep the
    residual stream entering the layer running now (and its RoPE cos/sin); `query(i)` is layer
    i + 1's query speculated from layer i's input. One per model (hooks installed once)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = decoder_layers(model)
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers)]

    @staticmethod
    def _hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            _pending.residual = (index, hidden, kwargs.get("position_embeddings"))
        return hook

    @classmethod
    def of(cls, model: torch.nn.Module) -> "_Speculator":
        spec = getattr(model, "_mempipe_speculator", None)
        if spec is None:
            spec = cls(model)
            object.__setattr__(model, "_mempipe_speculator", spec)  # not a submodule
        return spec

    def query(self, index: int) -> torch.Tensor | None:
        """Layer index + 1's speculated query, or None for the last layer."""
        if index + 1 >= len(self.layers):
            return None
        got = getattr(_pending, "residual", None)
        if got is None or got[0] != index:
            raise RuntimeError(f"mempipe lookahead_query=projected: layer {index}'s input "
                               "hidden state was not captured (its decoder layer's forward "
                               "pre-hook did not run for this call)")
        _, hidden, pe = got
        if pe is None:
            raise RuntimeError("mempipe lookahead_query=projected: the decoder layers get no "
                               "position_embeddings (cos, sin) from this model/transformers "
                               "version; use lookahead_query=same")
        return speculated_query(self.layers[index + 1], hidden, pe[0], pe[1])


class MempipeCache(Cache):
    """transformers `Cache` whose layers keep mempipe pages and digests across steps.

    `model`: needed by lookahead=true with lookahead_query=projected (the default), which
    speculates layer L+1's query from layer L's input with the model's own weights."""

    def __init__(self, config: mempipe_config.MempipeConfig | None = None,
                 model: torch.nn.Module | None = None, **kwargs):
        self.config = config if config is not None else mempipe_config.load()
        reasons = self.config.validate()
        if reasons:
            raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
        self.model = model
        self._speculator = _Speculator.of(model) if model is not None else None
        self._check_speculation()
        self.plan = DecodePlan()
        self._paged: dict[int, PagedLayer] = {}
        self._steps: dict = {}
        cache = self

        class _Layer(MempipePagedLayer):
            def __init__(self, **kw):
                super().__init__(cache=cache)

        super().__init__(layer_class_to_replicate=_Layer)

    def _check_speculation(self) -> None:
        c = self.config
        if c.lookahead and c.lookahead_query == "projected" and self._speculator is None:
            raise ValueError("mempipe: lookahead=true with lookahead_query=projected speculates "
                             "layer L+1's query from the model's weights: pass "
                             "MempipeCache(config, model=model) (or set lookahead_query=same)")

    def lookahead_query(self, index: int) -> torch.Tensor | None:
        """Layer index + 1's speculated query for layer index's decode call, when the
        configuration asks for one (lookahead=true, lookahead_query=projected) and layer
        index + 1 exists and is sparse; else None."""
        c = self.config
        if not (c.lookahead and c.lookahead_query == "projected"):
            return None
        self._check_speculation()  # the config may have been swapped since construction
        if not c.layer_sparse(index + 1):
            return None
        return self._speculator.query(index)

    def step_seq_lens(self, batch: int, length: int, device) -> torch.Tensor:
        """seq_lens of this step, made once per step and shared by the layers."""
        key = (batch, length, device)
        t = self._steps.get(key)
        if t is None:
            self._steps.clear()
            t = self._steps[key] = torch.full((batch,), length, dtype=torch.int32,
                                              device=device)
        return t

    def calls(self) -> dict[str, int]:
        """Calls per path summed over the layers (sparse, dense, prefill)."""
        total = {"sparse": 0, "dense": 0, "prefill": 0}
        for p in self._paged.values():
            if p is not None:
                for k, v in p.calls.items():
                    total[k] += v
        return total


def _is_plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    dev = mask.device
    rows = torch.arange(kv_len - q_len, kv_len, device=dev).unsqueeze(1)
    allowed = torch.arange(kv_len, device=dev).unsqueeze(0) <= rows  # [q_len, kv_len]
    if mask.dtype == torch.bool:
        seen = mask
    else:  # additive float mask: 0 keeps, a large negative value drops
        seen = mask > torch.finfo(mask.dtype).min / 2
    return bool((seen[..., :q_len, :kv_len] == allowed).all())


def _cached_forward(module, layer_state, start, query, scale):
    """The MempipeCache path: the new tokens are already in the pages."""
    cache = layer_state.cache
    batch, num_heads, q_len, head_dim = query.shape
    idx = cache.layers.index(layer_state)
    paged = cache._paged.get(idx)
    if paged is None or paged.num_heads != num_heads:
        paged = PagedLayer(cache.config, idx, num_heads, layer_state.kv_heads, head_dim, scale,
                           plan=cache.plan)
        cache._paged[idx] = paged
    length = layer_state.length
    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    if q_len == 1:
        held = digest_store.digest_dtype_of(layer_state.digests)
        if held != cache.config.digest_dtype:
            raise ValueError(f"mempipe: this MempipeCache's pages hold {held} digests but its "
                             f"configuration asks digest_dtype={cache.config.digest_dtype}; "
                             "use a new MempipeCache to change the digest dtype")

        out = torch.empty_like(q)
        lens = cache.step_seq_lens(batch, length, query.device)
        paged.decode(q, layer_state.kv_cache, layer_state.block_table, lens, out,
                     digests=layer_state.digests, lookahead_query=cache.lookahead_query(idx))
        return out.view(batch, 1, num_heads, head_dim)
    paged.calls["prefill"] += 1
    if query.is_cuda:
        if start == 0:  # the prompt is the whole context, contiguous: transformers' own SDPA
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            key, value = _pending.kv
            out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0,
                                            scaling=scale, is_causal=True)
            return out
        outs = []  # a prefix is cached: the sequence's pages gathered, causal with an offset
        for b in range(batch):
            k, v = gather_context(layer_state.kv_cache, layer_state.block_table[b], length)
            outs.append(sdpa_causal(query[b:b + 1], k[None], v[None], scale)[0].transpose(0, 1))
        return torch.stack(outs)
    starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
    lens = torch.full((batch,), length, dtype=torch.int32)
    out = torch.ops.mempipe.prefill_attention(q, starts, layer_state.kv_cache,
                                              layer_state.block_table, lens, scale)
    return out.view(batch, q_len, num_heads, head_dim)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, Sq, D]; key, value [B, KVH, Skv, D]. Returns ([B, Sq, H, D], None)."""
    if dropout:
        raise NotImplementedError(f"mempipe attention has no dropout, got {dropout}")
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    state = getattr(_pending, "state", None)
    _pending.state = None
    if state is not None and state[1] is key:
        layer_state, _, start = state
        if attention_mask is not None and not _is_plain_causal(attention_mask, q_len,
                                                               layer_state.length):
            raise NotImplementedError("mempipe's transformers adapter supports causal "
                                      "attention without padding only")
        _pending.kv = (key, value)
        try:
            return _cached_forward(module, layer_state, start, query, scale), None
        finally:
            _pending.kv = None

    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        raise NotImplementedError("mempipe's transformers adapter supports causal attention "
                                  "without padding only")
    cfg = mempipe_config.load()
    reasons = cfg.validate()
    if reasons:
        raise ValueError("mempipe configuration rejected: " + "; ".join(reasons))
    if cfg.placement == "fpga" or cfg.reuse > 1 or cfg.lookahead or cfg.mode != "sync":
        raise ValueError("mempipe: placement fpga, reuse > 1, lookahead and mode pipelined keep "
                         "state across steps and layers: pass past_key_values="
                         f"mempipe.hf.MempipeCache() (got {cfg})")
    page = cfg.page_size
    pages_per_seq = -(-kv_len // page)
    dev = key.device

    # No MempipeCache: page the context, sequence b owns blocks [b * pps, (b + 1) * pps).
    kv_cache = poisoned_cache(batch * pages_per_seq, page, kv_heads, head_dim, key.dtype, dev,
                              cfg.kv_layout)
    digests = digest_store.op_args(digest_store.empty(batch * pages_per_seq, kv_heads, head_dim,
                                                      key.dtype, dev, cfg.digest_dtype))
    block_table = torch.arange(batch * pages_per_seq, dtype=torch.int32,
                               device=dev).view(batch, -1)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=dev)
    slots = (torch.arange(batch, device=dev).unsqueeze(1) * pages_per_seq * page
             + torch.arange(kv_len, device=dev).unsqueeze(0)).flatten()
    rows = lambda t: t.transpose(1, 2).reshape(batch * kv_len, kv_heads, head_dim)  # noqa: E731
    torch.ops.mempipe.write_kv(kv_cache, slots, rows(key), rows(value))

    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    layer = getattr(module, "layer_idx", 0)
    if q_len == 1 and cfg.layer_sparse(layer):
        mempipe.ops.build_digests_any(kv_cache, block_table, seq_lens,
                                      digest_store.from_op_args(*digests))
        pages, counts = torch.ops.mempipe.score_and_select(
            q, kv_cache, digests[0], block_table, seq_lens, cfg.budget, cfg.sinks, cfg.locals,
            cfg.aggregation, digest_scales=digests[1], digest_exact=digests[2])

        out = torch.ops.mempipe.sparse_decode(q, kv_cache, block_table, seq_lens, pages, counts,
                                              scale)
    else:
        starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=dev)
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
