"""mempipe backend configuration: one environment variable, or vLLM's additional config.

    MEMPIPE_CONFIG="placement=cpu,budget=4096,page_size=16,dense_layers=2,reuse=1,mode=sync"

Keys (all optional):
    placement     dense | cpu | gpu | fpga   where steps 1-3 run (ARCHITECTURE.md presets);
                  `dense` turns selection off (the baseline). From Python, `cpu` takes host
                  tensors and `gpu` CUDA tensors (a GPU build); `fpga` is not available.
    budget        tokens kept per (sequence, KV head); a multiple of page_size.
    page_size     16 | 32 | 64; must equal vLLM's --block-size.
    dense_layers  the first N layers attend densely (Quest keeps 2).
    sinks, locals pages always kept at the start / end of each sequence.
    aggregation   max | sum over the query heads of a GQA group.
    reuse         reuse a selection for C decode steps.
    mode          sync | pipelined.
    hierarchy     none | <page>in<super-page> in tokens, e.g. 16in64 (page_size 16): score
                  super-pages of 2, 4 or 8 pages first, then only the pages of the best ones
                  (retriever/hierarchical.h; LServe's 16-in-64 geometry). Needs a block table
                  that keeps each super-page's pages in one aligned group of blocks; served by
                  the emulated FPGA card (placement fpga) only, so refused elsewhere.

In vLLM the same keys may come from `--additional-config '{"mempipe": {"budget": 2048}}'`;
the environment variable wins where both set a key, so one run can be retargeted without
editing a launch script. `validate()` lists every reason a configuration cannot run in this
build instead of stopping at the first; `validate(max_model_len=N)` also checks the budget
against the model's context.

Parsing is strict: integer keys take integers only (`locals=1.7`, `reuse=True` and
`budget=1e3` are errors, not 1), string keys take strings only, a key given twice in
MEMPIPE_CONFIG is an error, and every integer must fit the C++ side's int32.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from mempipe import _mempipe

ENV_VAR = "MEMPIPE_CONFIG"

PLACEMENTS = ("dense", "cpu", "gpu", "fpga")
MODES = ("sync", "pipelined")
AGGREGATIONS = ("max", "sum")
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
    hierarchy: str = "none"

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
        elif self.placement == "fpga":
            reasons.append("placement 'fpga' is not available from Python in this build; use "
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
        elif self.mode == "pipelined":
            reasons.append("mode 'pipelined' is not available from Python yet; use sync")
        reasons += self._hierarchy_reasons()
        if self.reuse < 1:
            reasons.append(f"reuse must be >= 1, got {self.reuse}")
        elif self.reuse > 1:
            reasons.append(f"reuse={self.reuse} is not available from Python yet "
                           "(selections are recomputed every step); use reuse=1")
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
        if self.placement != "fpga":
            return [f"hierarchy '{self.hierarchy}' runs on the FPGA card (placement fpga) only; "
                    f"placement '{self.placement}' selects flat: use hierarchy=none"]
        return []

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
    if _FIELDS[key].type in ("int", int):
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
