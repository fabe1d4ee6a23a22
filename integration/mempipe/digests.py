"""Page digests as the Python side holds them: native or int8 (MEMPIPE_CONFIG digest_dtype).

    dg = mempipe.digests.empty(num_blocks, kv_heads, head_dim, torch.bfloat16, "cpu", "int8")
    mempipe.steps.append_kv_and_digests(kv_cache, slot_mapping, key, value, dg)
    mempipe.steps.score_and_select(query, kv_cache, dg, block_table, seq_lens, pages, counts,
                                   budget=4096)

native  one tensor [num_blocks, 2, num_kv_heads, head_dim] in the cache dtype: per page and KV
        head the channel-wise max ([b, 0]) and min ([b, 1]) of the keys (Quest).
int8    an `Int8Digests` (retriever/digest.h kInt8, retriever/int8_quant.h):
          codes  [num_blocks, 2, num_kv_heads, head_dim] int8: max rounded up, min rounded down
          scales [num_blocks, num_kv_heads] float32: one scale per page and KV head
          exact  [num_blocks, 2, num_kv_heads, head_dim] cache dtype: the exact max/min
        Appends and builds widen `exact` and re-quantize every (page, KV head) they touch from
        it, so the bound fl(code * scale) contains every key of the page after every token;
        scoring reads codes and scales only: 2 * head_dim + 4 bytes per page and KV head
        instead of 2 * head_dim * dtype bytes (260 B against 512 B for bf16, head_dim 128).

The module's functions (mempipe.steps) take either form wherever they take `digests`: a tensor
is a native digest, an object with `codes`, `scales` and `exact` an int8 one. The torch
operators (mempipe.ops) take the three tensors as `digests, digest_scales, digest_exact`
(`op_args` splits either form). Unwritten pages are poisoned (NaN; int8 codes -128, which no
quantization produces): a page is only scored after a token was appended to it, which resets
its digest first. `empty(..., poison=False)` gives zeros instead, on the host from an anonymous
mapping (see `empty`): what a serving layer (mempipe.attention.PagedLayer) takes there.
"""

from __future__ import annotations

import math
import mmap
from typing import Union

import torch

DIGEST_DTYPES = ("native", "int8")
POISON_CODE = -128  # codes lie in [-127, 127] (int8_quant.h kQLimit)
SCALE_BYTES = 4     # one float32 per page and KV head


class Int8Digests:
    """int8 page digests: `codes`, `scales`, `exact` (module docstring), indexed by block.

    `d[i]` is a view of blocks `i` (an int, slice or index tensor) of all three tensors, and
    `d[i] = other` copies another Int8Digests' blocks in, so code that saves and restores
    native digest rows works on these unchanged.
    """

    __slots__ = ("codes", "scales", "exact")

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, exact: torch.Tensor):
        self.codes = codes
        self.scales = scales
        self.exact = exact

    @property
    def shape(self) -> torch.Size:
        """The codes' shape, [num_blocks, 2, num_kv_heads, head_dim] (a native digest's)."""
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __getitem__(self, index) -> Int8Digests:
        return Int8Digests(self.codes[index], self.scales[index], self.exact[index])

    def __setitem__(self, index, other: Int8Digests) -> None:
        if not isinstance(other, Int8Digests):
            raise TypeError(f"an Int8Digests takes blocks of another Int8Digests, got "
                            f"{type(other).__name__}")
        self.codes[index] = other.codes
        self.scales[index] = other.scales
        self.exact[index] = other.exact

    def clone(self) -> Int8Digests:
        return Int8Digests(self.codes.clone(), self.scales.clone(), self.exact.clone())

    def poison_(self) -> Int8Digests:
        self.codes.fill_(POISON_CODE)
        self.scales.fill_(float("nan"))
        self.exact.fill_(float("nan"))
        return self

    def dequantized(self) -> torch.Tensor:
        """The bound the scoring reads, [num_blocks, 2, kv_heads, head_dim] float32:
        fl(float(code) * scale), one fp32 multiply per element (int8_quant.h Dequantize)."""
        return self.codes.float() * self.scales[:, None, :, None]

    def __repr__(self) -> str:
        return (f"Int8Digests(codes={tuple(self.codes.shape)}, exact dtype "
                f"{self.exact.dtype}, device {self.codes.device})")


Digests = Union[torch.Tensor, Int8Digests]


def check_digest_dtype(digest_dtype: str) -> None:
    if digest_dtype not in DIGEST_DTYPES:
        raise ValueError(f"digest_dtype must be native or int8, got {digest_dtype!r}")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros; on the host from an anonymous mapping, outside the allocator's heap, whose pages
    the OS zero-fills on their first write (only the blocks ever appended to cost memory)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # The tensor keeps the mapping alive (torch.frombuffer holds a reference to the buffer).
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(shape)


def empty(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
          digest_dtype: str = "native", poison: bool = True) -> Digests:
    """Digests for a cache of `num_blocks` blocks in `dtype` on `device`: poisoned (module
    docstring), or with poison=False zeros, on the host from an anonymous mapping that the OS
    fills on first write. The latter is for long-lived host digests (one per serving layer,
    sized for the whole KV cache): allocated on each layer's first forward, poisoned digests
    were written in full there (2 MB per layer for SmolLM2 with a 2 GiB cache) and sat on the
    allocator's heap between the model's temporaries, so the first prompt paid for both (on
    the 2-vCPU build VM 4 x 256 bf16 tokens took 1.3x CPU_ATTN's first prefill)."""
    check_digest_dtype(digest_dtype)
    shape = (num_blocks, 2, num_kv_heads, head_dim)
    if not poison:
        exact = _zeros(shape, dtype, device)
        if digest_dtype == "native":
            return exact
        return Int8Digests(_zeros(shape, torch.int8, device),
                           _zeros((num_blocks, num_kv_heads), torch.float32, device), exact)
    exact = torch.full(shape, float("nan"), dtype=dtype, device=device)
    if digest_dtype == "native":
        return exact
    return Int8Digests(torch.full(shape, POISON_CODE, dtype=torch.int8, device=device),
                       torch.full((num_blocks, num_kv_heads), float("nan"), dtype=torch.float32,
                                  device=device),
                       exact)


def for_cache(kv_cache: torch.Tensor, digest_dtype: str = "native",
              poison: bool = True) -> Digests:
    """Digests for kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] (`empty`)."""
    _, num_blocks, _, kv_heads, head_dim = kv_cache.shape
    return empty(num_blocks, kv_heads, head_dim, kv_cache.dtype, kv_cache.device, digest_dtype,
                 poison)


def poison_(digests: Digests) -> None:
    """Marks every page unwritten (NaN; int8: codes -128 and NaN scales and exact rows)."""
    if isinstance(digests, Int8Digests):
        digests.poison_()
    else:
        digests.fill_(float("nan"))


def digest_dtype_of(digests: Digests) -> str:
    return "int8" if isinstance(digests, Int8Digests) else "native"


def op_args(digests: Digests) -> tuple:
    """(digests, digest_scales, digest_exact) for the torch operators of mempipe.ops."""
    if isinstance(digests, Int8Digests):
        return digests.codes, digests.scales, digests.exact
    return digests, None, None


def from_op_args(digests: torch.Tensor, digest_scales: torch.Tensor | None,
                 digest_exact: torch.Tensor | None) -> Digests:
    """The inverse of op_args; ValueError when only one of scales and exact is given."""
    if digest_scales is None and digest_exact is None:
        return digests
    if digest_scales is None or digest_exact is None:
        raise ValueError("int8 digests need both digest_scales and digest_exact (got only "
                         f"{'digest_scales' if digest_exact is None else 'digest_exact'})")
    return Int8Digests(digests, digest_scales, digest_exact)


def scanned_bytes_per_page_head(head_dim: int, elem_bytes: int,
                                digest_dtype: str = "native") -> int:
    """Bytes a scoring pass reads per (page, KV head): both rows in the cache dtype (native),
    or both rows of int8 codes plus the fp32 scale (DigestView::ScannedBytesPerPageHead)."""
    check_digest_dtype(digest_dtype)
    if digest_dtype == "int8":
        return 2 * head_dim + SCALE_BYTES
    return 2 * head_dim * elem_bytes
