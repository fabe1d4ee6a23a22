"""mempipe backend configuration: one environment variable, or vLLM's additional config.

    MEMPIPE_CONFIG="placement=cpu,budget=4096,page_size=16,dense_layers=2,reuse=1,mode=sync"

Keys (all optional):
    placement     dense | cpu | gpu | fpga   where steps 1-3 run (ARCHITECTURE.md presets);
                  `dense` turns selection off (the baseline). From Python, `cpu` takes host
                  tensors and `gpu` CUDA tensors (a GPU build); `fpga` runs steps 1-3 on the
                  selection-offload engine (`_mempipe.SelectionOffload`: the emulated U55C or a
                  card through XRT) and step 4 where the tensors are (CUDA: the GPU, on torch's
                  current stream without a host sync; CPU tensors: the host, the engine's CPU
                  mode, which is how CI runs the whole flow).
    budget        tokens kept per (sequence, KV head); a multiple of page_size.
    page_size     16 | 32 | 64; vLLM's --block-size must be a multiple of it: vLLM splits
                  each block into pages of page_size (the backend's kernel block size), so
                  its CPU default of 128 runs as it is.
    dense_layers  the first N layers attend densely (Quest keeps 2).
    sinks, locals pages always kept at the start / end of each sequence.
    aggregation   max | sum over the query heads of a GQA group.
    mode          sync | pipelined. pipelined: the batch's sequences are split into
                  `micro_batches` groups; every group's selection is submitted first, then group
                  i is waited for and decoded while the selector works on group i+1 (the same
                  tokens as sync). Every placement runs it.
    micro_batches groups of the pipelined mode, >= 1 (at most one per sequence is used); must be
                  1 in sync mode.
    reuse         C >= 1: a selection serves C decode steps, extended by the pages the sequences
                  grew into since it was made (so the newest token is always attended).
    reuse_async   true | false (default true), with reuse > 1. true: the selection made from
                  step t's query serves steps t+1..t+C and the decoder never waits for a fresh
                  one (the first step of a layer selects synchronously: nothing to reuse yet);
                  false: recomputed every C steps (steps t..t+C-1) and waited for, as LServe.
    lookahead     true | false (default false): layer L+1's digests are scored while layer L
                  runs (with the query `lookahead_query` names) and layer L+1 decodes with that
                  selection (the first sparse layer after a dense one takes it from that dense
                  layer's call; a layer no predecessor looked ahead for, e.g. at a layer's first
                  decode step, selects with its own query). Needs reuse=1.
    lookahead_query projected | same (default projected), with lookahead=true: the query
                  layer L+1's digests are scored with while layer L runs.
                  projected: layer L+1's own query *speculated* from the residual stream
                  entering layer L (InfiniGen's observation: it is close to the one entering
                  L+1): layer L+1's input RMSNorm, its W_q and RoPE at the current position
                  applied to layer L's input hidden state, one extra [hidden x q-width] GEMV
                  per layer. The model code computes it and hands it to PagedLayer.decode
                  (`lookahead_query=`): the transformers adapter does (MempipeCache(config,
                  model=model)), as does integration/bench/model_decode.py; vLLM's backend
                  sees only q/k/v and refuses it. same: layer L's own query (the first
                  version; on SmolLM2 it costs PPL x1.37 at B=1024, integration/quality).
    fpga_backend  emulated | xrt (placement fpga): the emulated U55C, or XRT (a card; on XRT's
                  noop shim every selection is invalid and falls back, counted).
    fpga_paced    true | false (default true): the emulated card completes no earlier than its
                  modeled U55C time (PCIe, launch, HBM scan, top-k).
    fpga_functional reference | hls (default reference): what computes the emulated card's
                  result: the multi-threaded CPU reference (same bits) or the HLS C-simulation.
    fpga_fallback gpu | dense (default gpu): what replaces a late, failed, invalid or dead
                  card's selection. gpu: the decode device keeps its own digest copy (the CUDA
                  append kernel maintains it anyway) and selects itself; dense: that layer
                  decodes densely. Counted by reason in SelectionOffload.metrics().
    deadline_ms   a selection's deadline from its submission, > 0 (default 100).
    fpga_append_ring  staging buffers of key appends per layer (placement fpga), 1..1024
                  (default 8): a layer's append waits only when this many of its earlier appends
                  are still queued for the card (then stream-ordered, at most 10 s, before the
                  card is declared dead). One append per layer per step; the schemes keep at
                  most about reuse + 2 in flight, so 8 covers reuse up to 6.
    digest_dtype  native | int8: page digests as max/min in the cache dtype, or int8 codes
                  rounded outward with one fp32 scale per page and KV head (the Quest bound
                  stays valid; 2 * head_dim + 4 bytes to scan per page and KV head instead of
                  2 * head_dim * dtype bytes; retriever/int8_quant.h, mempipe.digests). Every
                  placement: cpu and gpu keep int8 digests beside the cache (PagedLayer, the
                  transformers and vLLM adapters alike); fpga registers its layers on the card
                  as int8 and keeps its fallback copy int8 too.
    kv_layout     auto | head | page | head_kt | page_kt | token (default auto: page_kt where
                  the host kernels are AVX-512, head elsewhere; default_kv_layout()): how host
                  KV caches are laid out: the
                  region vLLM hands each layer (one contiguous region whose inner layout is the
                  backend's) and the transformers adapter's MempipeCache pages.
                  head: each KV head's page contiguous, [2, blocks, KVH, page, D] in memory (as
                  vLLM's own CPU attention keeps heads outside tokens), so sparse decode reads
                  whole pages instead of head_dim-long rows at the token stride; page:
                  [blocks, KVH, 2, page, D], a KV head's K page followed by its V page, one
                  piece twice head's size, and each block inside its own slice of the region;
                  head_kt, page_kt: head or page with each K page stored transposed,
                  [D / x, page, x] with x channels of 4 bytes (fp32 1, bf16 and fp16 2), so
                  that the AVX-512 kernel scores 16 tokens per vector without horizontal sums
                  (integration/bench/results/keys_transposed/; the view carries the mark,
                  attention.layout_view, and attention.logical_keys reads K back);
                  token: vLLM's FlashAttention layout [2, blocks, page, KVH, D]. CUDA caches
                  are always token (the GPU kernels read that one). The tensor the backend
                  hands mempipe's steps has the logical shape [2, blocks, page, KVH, D] in
                  every layout (a permuted view; attention.layout_view).
    hierarchy     none | <page>in<super-page> in tokens, e.g. 16in64 (page_size 16): score
                  super-pages of 2, 4 or 8 pages first, then only the pages of the best ones
                  (retriever/hierarchical.h; LServe's 16-in-64 geometry). Needs a block table
                  that keeps each super-page's pages in one aligned group of blocks. Parsed and
                  checked here, but only mempipe-bench and the C++ FpgaOptions run it so far;
                  validate() refuses any value but none.

In vLLM the same keys may come from `--additional-config '{"mempipe": {"budget": 2048}}'`;
the environment variable wins where both set a key, so one run can be retargeted without
editing a launch script. `validate()` lists every reason a configuration cannot run in this
build instead of stopping at the first; `validate(max_model_len=N)` also checks the budget
against the model's context.

Parsing is strict: integer keys take integers only (`locals=1.7`, `reuse=True` and
`budget=1e3` are errors, not 1), boolean keys take true/false only (text `true`/`false`, or a
Python bool; `lookahead=1` is an error), `deadline_ms` takes a number (not a bool), string
keys take strings only, a key given twice in MEMPIPE_CONFIG is an error, and every integer must
fit the C++ side's int32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from mempipe import _mempipe

ENV_VAR = "MEMPIPE_CONFIG"

PLACEMENTS = ("dense", "cpu", "gpu", "fpga")
MODES = ("sync", "pipelined")
AGGREGATIONS = ("max", "sum")
FPGA_BACKENDS = ("emulated", "xrt")
FPGA_FUNCTIONALS = ("reference", "hls")
FPGA_FALLBACKS = ("gpu", "dense")
LOOKAHEAD_QUERIES = ("projected", "same")
DIGEST_DTYPES = ("native", "int8")
KV_LAYOUTS = ("head", "page", "head_kt", "page_kt", "token")
# What MEMPIPE_CONFIG's kv_layout takes: a layout, or auto (default_kv_layout(), on load).
KV_LAYOUT_CHOICES = ("auto",) + KV_LAYOUTS
_BOOL_TEXT = {"true": True, "false": False}
# Defined once, in C++ (core/paged_kv.h, core/dtype.h); read from the module.
PAGE_SIZES = tuple(_mempipe.supported_block_sizes)
HEAD_DIMS = tuple(_mempipe.supported_head_dims)
DTYPES = tuple(_mempipe.supported_dtypes)
DEVICES = tuple(_mempipe.devices)
# The C++ side stores every integer key in an int32.
INT32_MAX = 2**31 - 1
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _one_of(values: tuple) -> str:
    """(16, 32, 64) -> "16, 32 or 64"."""
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _kv_layout_reason(layout: str, choices: tuple = KV_LAYOUTS) -> str:
    return f"kv_layout must be {_one_of(choices)}, got {layout!r}"


def default_kv_layout() -> str:
    """What kv_layout=auto (the default) resolves to: page_kt where the host kernels are AVX-512
    (_mempipe.active_cpu_kernel()), head elsewhere. page_kt gives sparse decode a block's K and V
    pages as one piece and the AVX-512 scores 16 tokens a vector; the AVX2 and portable kernels
    copy transposed K pages back into rows, and read head fastest
    (integration/bench/results/layout_default/)."""
    return "page_kt" if _mempipe.active_cpu_kernel().startswith("avx512") else "head"


def require_kv_layout(layout: str) -> str:
    """`layout` if it is one of KV_LAYOUTS; ValueError naming it otherwise."""
    if layout not in KV_LAYOUTS:
        raise ValueError(_kv_layout_reason(layout))
    return layout


@dataclasses.dataclass(frozen=True)
class MempipeConfig:
    placement: str = "cpu"
    budget: int = 4096
    page_size: int = 16
    dense_layers: int = 2
    sinks: int = 1
    locals: int = 1
    aggregation: str = "max"
    reuse: int = 1
    mode: str = "sync"
    micro_batches: int = 1
    reuse_async: bool = True
    lookahead: bool = False
    lookahead_query: str = "projected"
    fpga_backend: str = "emulated"
    fpga_paced: bool = True
    fpga_functional: str = "reference"
    fpga_fallback: str = "gpu"
    deadline_ms: float = 100.0
    fpga_append_ring: int = 8
    digest_dtype: str = "native"
    kv_layout: str = "auto"
    hierarchy: str = "none"

    def __post_init__(self) -> None:
        # auto is resolved here, once, so every reader (and the configuration's repr, in a
        # bench's record) sees the layout itself.
        if self.kv_layout == "auto":
            object.__setattr__(self, "kv_layout", default_kv_layout())

    @property
    def sparse(self) -> bool:
        return self.placement != "dense"

    def layer_sparse(self, layer: int) -> bool:
        """True when `layer` selects pages: a sparse placement and not one of the first
        dense_layers layers (the rule lives in C++, backend/policy.h)."""
        return self.sparse and not _mempipe.is_dense_layer(layer, self.dense_layers)

    def validate(self, max_model_len: int | None = None) -> list[str]:
        """Reasons this configuration cannot run in this build; empty when it can.
        `max_model_len`: the model's context in tokens; a budget above it is refused."""
        reasons = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    reasons.append(f"{f.name} must be an integer, got {value!r}")
                    return reasons  # the checks below compare numbers
                if not -INT32_MAX - 1 <= value <= INT32_MAX:
                    reasons.append(f"{f.name} must fit a 32-bit integer, got {value}")
            elif f.type in ("bool", bool):
                if not isinstance(value, bool):
                    reasons.append(f"{f.name} must be true or false, got {value!r}")
                    return reasons
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    reasons.append(f"{f.name} must be a number, got {value!r}")
                    return reasons
            elif not isinstance(value, str):
                reasons.append(f"{f.name} must be a string, got {value!r}")
                return reasons
        if reasons:
            return reasons
        if max_model_len is not None and self.budget > max_model_len:
            reasons.append(f"budget {self.budget} tokens exceeds the model's context "
                           f"max_model_len={max_model_len}")
        if self.placement not in PLACEMENTS:
            reasons.append(f"placement must be one of {', '.join(PLACEMENTS)}, "
                           f"got '{self.placement}'")
        elif self.placement == "fpga" and not hasattr(_mempipe, "SelectionOffload"):
            reasons.append("placement 'fpga' needs the selection-offload engine "
                           "(_mempipe.SelectionOffload), which this build of mempipe lacks; use "
                           "cpu, gpu or dense")
        elif self.placement == "gpu" and "cuda" not in DEVICES:
            reasons.append("placement 'gpu' needs a GPU build of mempipe (this one runs "
                           f"{', '.join(DEVICES)} tensors only; see README, MEMPIPE_GPU); use "
                           "cpu or dense")
        if self.page_size not in PAGE_SIZES:
            reasons.append(f"page_size must be {_one_of(PAGE_SIZES)}, got {self.page_size}")
        if self.budget <= 0:
            reasons.append(f"budget must be a positive number of tokens, got {self.budget}")
        elif self.page_size in PAGE_SIZES:
            pages = self.budget // self.page_size
            if self.budget % self.page_size:
                reasons.append(f"budget must be a positive multiple of page_size "
                               f"{self.page_size}, got {self.budget}")
            elif self.sinks + self.locals > pages:
                reasons.append(f"budget {self.budget} tokens = {pages} pages cannot hold "
                               f"{self.sinks} sink + {self.locals} local pages")
        try:  # the C++ check (backend/policy.h), which names the bad value
            _mempipe.is_dense_layer(0, self.dense_layers)
        except ValueError as e:
            reasons.append(str(e))
        if self.sinks < 0:
            reasons.append(f"sinks must be >= 0, got {self.sinks}")
        if self.locals < 1:
            reasons.append(f"locals must be >= 1 (the page of the newest token), got {self.locals}")
        if self.aggregation not in AGGREGATIONS:
            reasons.append(f"aggregation must be max or sum, got '{self.aggregation}'")
        if self.mode not in MODES:
            reasons.append(f"mode must be sync or pipelined, got '{self.mode}'")
        if self.micro_batches < 1:
            reasons.append(f"micro_batches must be >= 1, got {self.micro_batches}")
        elif self.mode == "sync" and self.micro_batches != 1:
            reasons.append(f"micro_batches must be 1 in sync mode, got {self.micro_batches} "
                           "(use mode=pipelined)")
        reasons += self._hierarchy_reasons()
        if self.reuse < 1:
            reasons.append(f"reuse must be >= 1, got {self.reuse}")
        elif self.reuse > 1 and self.lookahead:
            reasons.append(f"lookahead needs reuse=1, got reuse={self.reuse} (look-ahead "
                           "selects a layer's pages afresh every step)")
        if self.lookahead_query not in LOOKAHEAD_QUERIES:
            reasons.append(f"lookahead_query must be {_one_of(LOOKAHEAD_QUERIES)}, "
                           f"got '{self.lookahead_query}'")
        if self.fpga_backend not in FPGA_BACKENDS:
            reasons.append(f"fpga_backend must be {_one_of(FPGA_BACKENDS)}, "
                           f"got '{self.fpga_backend}'")
        if self.fpga_functional not in FPGA_FUNCTIONALS:
            reasons.append(f"fpga_functional must be {_one_of(FPGA_FUNCTIONALS)}, "
                           f"got '{self.fpga_functional}'")
        if self.fpga_fallback not in FPGA_FALLBACKS:
            reasons.append(f"fpga_fallback must be {_one_of(FPGA_FALLBACKS)}, "
                           f"got '{self.fpga_fallback}'")
        if not 1 <= self.fpga_append_ring <= 1024:
            reasons.append(f"fpga_append_ring must be in [1, 1024], got {self.fpga_append_ring}")
        if not (math.isfinite(self.deadline_ms) and self.deadline_ms > 0):
            reasons.append(f"deadline_ms must be a positive number of milliseconds, "
                           f"got {self.deadline_ms}")
        if self.digest_dtype not in DIGEST_DTYPES:
            reasons.append(f"digest_dtype must be native or int8, got '{self.digest_dtype}'")
        if self.kv_layout not in KV_LAYOUTS:
            reasons.append(_kv_layout_reason(self.kv_layout, KV_LAYOUT_CHOICES))
        return reasons


    def _hierarchy_reasons(self) -> list[str]:
        """The checks of ParsePageHierarchy (retriever/hierarchical.h), and where it runs."""
        if self.hierarchy == "none":
            return []
        page, sep, super_page = self.hierarchy.partition("in")
        if not (sep and _INT_TEXT.fullmatch(page) and _INT_TEXT.fullmatch(super_page)):
            return [f"hierarchy must be 'none' or '<page>in<super-page>' in tokens (e.g. "
                    f"'16in64'), got '{self.hierarchy}'"]
        page, super_page = int(page), int(super_page)
        if page != self.page_size:
            return [f"hierarchy '{self.hierarchy}' has {page}-token pages but page_size is "
                    f"{self.page_size}"]
        if page <= 0 or super_page % page or super_page // page not in (2, 4, 8):
            return [f"hierarchy '{self.hierarchy}': a super-page must be 2, 4 or 8 pages of "
                    f"{page} tokens"]
        # NOTE: SelectionOffload (placement fpga) and the cpu/gpu kernels select flat; refusing
        # here keeps a config from silently running flat.
        return [f"hierarchy '{self.hierarchy}' is not wired into the Python placements yet "
                f"(placement '{self.placement}' selects flat); it runs in mempipe-bench "
                "(--hierarchy) and FpgaOptions::pages_per_super_page: use hierarchy=none"]

    @property
    def pages_per_super_page(self) -> int:
        """1 for hierarchy=none, else super-page tokens / page tokens (FpgaOptions'
        pages_per_super_page); meaningful once validate() is empty."""
        if self.hierarchy == "none":
            return 1
        page, _, super_page = self.hierarchy.partition("in")
        return int(super_page) // int(page)


_FIELDS = {f.name: f for f in dataclasses.fields(MempipeConfig)}


def _coerce(key: str, value: Any) -> Any:
    """A typed value for `key`, strictly: an int key takes an int (not a bool, not a float) or
    the text of one; a string key takes a string. Raises ValueError naming key and value."""
    if not isinstance(key, str) or key not in _FIELDS:
        raise ValueError(f"{ENV_VAR}: unknown key {key!r} (known: {', '.join(_FIELDS)})")
    kind = _FIELDS[key].type
    if kind in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip() in _BOOL_TEXT:
            return _BOOL_TEXT[value.strip()]
        raise ValueError(f"{ENV_VAR}: {key} must be true or false, got {value!r}")
    if kind in ("float", float):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"{ENV_VAR}: {key} must be a finite number, got {value!r}")
        return number
    if kind in ("int", int):
        if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            number = int(value.strip())
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise ValueError(f"{ENV_VAR}: {key} must be an integer, got {value!r}")
        if not -INT32_MAX - 1 <= number <= INT32_MAX:
            raise ValueError(f"{ENV_VAR}: {key} must fit a 32-bit integer, got {number}")
        return number
    if not isinstance(value, str):
        raise ValueError(f"{ENV_VAR}: {key} must be a string, got {value!r}")
    return value.strip()


def parse(text: str) -> dict[str, Any]:
    """Parses "k=v,k=v" into typed values. Raises ValueError naming a bad key or value, or a
    key given twice."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR}: expected key=value, got '{item}'")
        key = key.strip()
        if key in out:
            raise ValueError(f"{ENV_VAR}: key '{key}' is given twice")
        out[key] = _coerce(key, value.strip())
    return out


def load(extra: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> MempipeConfig:
    """The configuration from `extra` (e.g. vLLM's additional_config["mempipe"]) overridden by
    the MEMPIPE_CONFIG variable of `environ` (default os.environ)."""
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"mempipe's additional config must be a mapping, got {extra!r}")
    values: dict[str, Any] = {k: _coerce(k, v) for k, v in (extra or {}).items()}
    values.update(parse((environ if environ is not None else os.environ).get(ENV_VAR, "")))
    return MempipeConfig(**values)
