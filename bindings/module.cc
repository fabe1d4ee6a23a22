// mempipe bindings: the `mempipe._mempipe` Python module.
//
// Exposes the four pipeline steps on caller-owned tensors (anything with `__dlpack__`), used in
// place: outputs are tensors the caller allocated, and nothing is copied in either direction.
// Each function converts its tensors to the core's views, checks that every tensor's extent
// matches the view (the cores trust the sizes they are given), releases the GIL, runs the core
// and turns a non-OK absl::Status into a Python exception (bindings/dlpack_tensor.h).
//
//   import torch, mempipe._mempipe as mp
//   mp.append_kv_and_digests(kv_cache, slot_mapping, key, value, digests)
//   mp.score_and_select(query, kv_cache, digests, block_table, seq_lens, pages, counts,
//                       budget=4096, sinks=1, locals=1, aggregation="max", num_threads=4)
//   mp.sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
//                    num_threads=4)
//   mp.score_select_decode(query, kv_cache, digests, block_table, seq_lens, pages, counts, out,
//                          scale, budget=512, num_threads=4)  # both, as one call (host tensors)
// num_threads (CPU tensors; >= 1, default 1): host threads sharing the work (decode: chunks of a
// sequence's pages per KV head; relevancy and selection: (sequence, KV head) rows). No result
// depends on it.
//
// Shapes (the cores' layouts; T tokens, S sequences, H query heads, KVH KV heads, D head_dim):
//   kv_cache      [2, num_blocks, block_size, KVH, D]  fp32 | fp16 | bf16; C-contiguous, or in
//                 host memory a head-major view t.permute(0, 1, 3, 2, 4) of a contiguous
//                 [2, num_blocks, KVH, block_size, D] t, or a page-major view
//                 t.permute(2, 0, 3, 1, 4) of a contiguous [num_blocks, KVH, 2, block_size, D] t
//                 (CacheView)
//   digests       [num_blocks, 2, KVH, D]               cache dtype (native), or an int8 digest
//                 (mempipe.digests.Int8Digests; retriever/digest.h kInt8): any object with
//                 .codes  [num_blocks, 2, KVH, D] int8 (max codes rounded up, min down)
//                 .scales [num_blocks, KVH] float32 (one scale per page and KV head)
//                 .exact  [num_blocks, 2, KVH, D] cache dtype (the exact max/min; builds and
//                         appends keep it and re-quantize from it, scoring never reads it)
//   key, value    [T, KVH, D]                            cache dtype
//   slot_mapping  [T] int64
//   block_table   [S, max_blocks_per_seq] int32;  seq_lens [S] int32
//   query, out    [S, H, D] (decode) or [T, H, D] (prefill); query_start_loc [S + 1] int32
//   scores        [S, KVH, max_blocks_per_seq] fp32
//   pages         [S, KVH, max_selected] int32;   counts [S, KVH] int32
//
// Devices and streams: every function dispatches on the tensors' DLPack device. Host tensors
// (cpu, cuda_host) run the CPU code; CUDA tensors run the GPU launchers (attention/gpu,
// retriever/gpu) in a CUDA build of the module (`devices` lists what the build runs), on the
// stream `stream=` names: None (default) means torch.cuda.current_stream(device), an int is a
// raw cudaStream_t, an object with `cuda_stream` (torch.cuda.Stream) gives its handle. The
// launch is asynchronous on that stream: nothing synchronizes, nothing is allocated. GPU
// scratch memory is the caller's (`workspace=`, a uint8 tensor on the same device, at least
// decode_workspace_bytes(...) / select_workspace_bytes(...) / append_workspace_bytes(...)
// bytes; optional for the append, whose default is the stream-ordered pool), so a plan can own it
// for a whole step and a CUDA graph can capture the launches. One call's tensors must share one
// device; a stream of another device, a non-contiguous tensor, a wrong dtype or shape raises
// ValueError naming the tensor with its device, dtype and shape. Functions without a GPU
// kernel (write_kv, update_digests, prefill_attention) raise NotImplementedError on CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/decode.h"
#include "backend/host_sparse_layer.h"
#include "backend/policy.h"
#include "backend/selection_offload.h"
#include "bindings/dlpack_tensor.h"
#include "core/cpu_kernel.h"
#include "core/host_parallel_runtime.h"
#include "core/huge_pages.h"
#include "core/paged_kv.h"
#include "core/status_macros.h"
#include "fpga/fpga_selector.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

#ifdef MEMPIPE_MODULE_GPU
#include "attention/gpu/paged_decode_gpu.h"
#include "backend/gpu/gpu_selection_offload.h"
#include "bindings/gpu_device.h"
#include "retriever/gpu/digest_gpu.h"
#include "retriever/gpu/select_gpu.h"
#endif

namespace mempipe::bindings {
namespace {

using py::arg;

BorrowedTensor Borrow(const py::handle& obj, const char* name) {
  return ValueOrThrow(BorrowTensor(obj, name));
}

// With its strides, which the caller checks.
BorrowedTensor BorrowStrided(const py::handle& obj, const char* name) {
  return ValueOrThrow(BorrowTensor(obj, name, /*strided=*/true));
}

void Check(const absl::Status& status) { ThrowIfError(status); }

template <size_t N>
py::tuple IntTuple(const int (&values)[N]) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = values[i];
  return t;
}

#ifdef MEMPIPE_MODULE_GPU
constexpr bool kGpuBuild = true;
#else
constexpr bool kGpuBuild = false;
using GpuStream = void*;
#endif

// Where one call runs: the host, or one CUDA device on one stream.
struct Target {
  bool gpu = false;
  int device = 0;
  GpuStream stream = nullptr;
};

// torch's current stream of `device` as a raw handle (torch._C._cuda_getCurrentRawStream is
// what torch's own extensions read; torch.cuda.current_stream() where it is absent).
GpuStream TorchCurrentStream(int device) {
  static py::object* raw = nullptr;
  static py::object* current = nullptr;
  if (raw == nullptr && current == nullptr) {
    py::module_ torch;
    try {
      torch = py::module_::import("torch");
    } catch (py::error_already_set&) {
      Check(absl::InvalidArgumentError(
          "CUDA tensors without torch: pass the stream explicitly (stream=<cudaStream_t int>)"));
    }
    py::object c = torch.attr("_C");
    // NOTE: leaked on purpose, so that nothing is released after the interpreter finalizes.
    if (py::hasattr(c, "_cuda_getCurrentRawStream")) {
      raw = new py::object(c.attr("_cuda_getCurrentRawStream"));
    } else {
      current = new py::object(torch.attr("cuda").attr("current_stream"));
    }
  }
  if (raw != nullptr) {
    return reinterpret_cast<GpuStream>((*raw)(device).cast<uintptr_t>());
  }
  return reinterpret_cast<GpuStream>((*current)(device).attr("cuda_stream").cast<uintptr_t>());
}

// The caller's stream argument: None, an int handle, or an object with `cuda_stream`
// (torch.cuda.Stream; its `device_index`, when present, must be `device`).
GpuStream StreamOf(const py::object& stream, int device) {
  if (stream.is_none()) return TorchCurrentStream(device);
  if (py::isinstance<py::int_>(stream)) {
    return reinterpret_cast<GpuStream>(stream.cast<uintptr_t>());
  }
  if (py::hasattr(stream, "cuda_stream")) {
    if (py::hasattr(stream, "device_index")) {
      const int d = stream.attr("device_index").cast<int>();
      if (d != device) {
        Check(absl::FailedPreconditionError(absl::StrCat("stream is a stream of cuda:", d,
                                                         " but the tensors are on cuda:", device)));
      }
    }
    return reinterpret_cast<GpuStream>(stream.attr("cuda_stream").cast<uintptr_t>());
  }
  Check(absl::InvalidArgumentError(
      absl::StrCat("stream must be None, an int (cudaStream_t) or a torch.cuda.Stream, got ",
                   std::string(py::str(py::type::of(stream).attr("__name__"))))));
  return nullptr;
}

// Raises unless `t` is on `first`'s device (host memory counts as one device).
void RequireSameDevice(const BorrowedTensor& first, const BorrowedTensor& t) {
  const bool same = IsHostDevice(first.device) ? IsHostDevice(t.device)
                                               : t.device.device_type == first.device.device_type &&
                                                     t.device.device_id == first.device.device_id;
  if (!same) {
    Check(absl::InvalidArgumentError(absl::StrCat("all tensors of one call must be on one device: ",
                                                  first.Describe(), " but ", t.Describe())));
  }
}

// Every tensor of a call on one device: host memory (the CPU code), or one CUDA device of a
// GPU build. Errors name the first tensor and the one that differs, with device, dtype, shape.
Target ResolveTarget(std::initializer_list<const BorrowedTensor*> tensors,
                     const py::object& stream) {
  const BorrowedTensor* first = *tensors.begin();
  for (const BorrowedTensor* t : tensors) RequireSameDevice(*first, *t);
  Target target;
  if (IsHostDevice(first->device)) return target;
  if (first->device.device_type != kDLCUDA || !kGpuBuild) {
    Check(absl::UnimplementedError(absl::StrCat(
        first->Describe(), " is in device memory, which this build of mempipe does not run",
        " (mempipe.steps.devices = ", kGpuBuild ? "('cpu', 'cuda')" : "('cpu',)",
        "); host tensors run on the CPU")));
  }
  target.gpu = true;
  target.device = first->device.device_id;
  target.stream = StreamOf(stream, target.device);
#ifdef MEMPIPE_MODULE_GPU
  // torch's current stream of the tensors' device needs no check; a handle the caller names
  // does (a torch.cuda.Stream's device_index was checked in StreamOf).
  if (py::isinstance<py::int_>(stream)) Check(CheckStreamDevice(target.stream, target.device));
#endif
  return target;
}

// A function without a GPU kernel, called with CUDA tensors.
void NoGpuKernel(const Target& target, const char* function, const char* instead) {
  if (!target.gpu) return;
  Check(absl::UnimplementedError(
      absl::StrCat(function, " has no GPU kernel (cuda:", target.device, " tensors); ", instead)));
}

// Borrows a kv_cache argument, whose strides CacheView checks.
BorrowedTensor BorrowCache(const py::handle& obj) {
  return ValueOrThrow(BorrowTensor(obj, "kv_cache", /*strided=*/true));
}

// The attribute mempipe.attention.layout_view sets on a head- or page-major view whose K pages
// are transposed (head_kt, page_kt): strides cannot say so, the view object does.
constexpr const char* kKeysTransposedAttr = "_mempipe_keys_transposed";

// Converts a [2, num_blocks, block_size, KVH, D] tensor (BorrowCache): C-contiguous, the
// token-major layout; or, in host memory, the head-major one: t.permute(0, 1, 3, 2, 4) of a
// contiguous [2, num_blocks, KVH, block_size, D] tensor t (each KV head's page contiguous), or
// the page-major one: t.permute(2, 0, 3, 1, 4) of a contiguous [num_blocks, KVH, 2, block_size,
// D] tensor t (a KV head's K and V pages one piece), as the vLLM plugin lays out host caches.
// Other strides are refused, naming them. A head- or page-major view that `obj` marks with
// kKeysTransposedAttr = True is head_kt or page_kt (each K page [D / x, block_size, x]).
KvCacheView CacheView(const BorrowedTensor& kv, py::handle obj) {
  Check(kv.RequireRank(5));
  Check(kv.RequireDim(0, 2, "K and V"));
  KvCacheView v;
  v.data = kv.data;
  v.dtype = ValueOrThrow(kv.FloatDType());
  v.num_blocks = static_cast<int>(kv.shape[1]);
  v.block_size = static_cast<int>(kv.shape[2]);
  v.num_kv_heads = static_cast<int>(kv.shape[3]);
  v.head_dim = static_cast<int>(kv.shape[4]);
  // Expected strides of [2, blocks, tokens, heads, D] in each layout; size-1 dimensions match any.
  auto matches = [&](KvLayout layout) {
    KvCacheView l = v;
    l.layout = layout;
    const int64_t want[5] = {
        static_cast<int64_t>(l.KvStride()), static_cast<int64_t>(l.BlockStride()),
        static_cast<int64_t>(l.TokenStride()), static_cast<int64_t>(l.HeadStride()), 1};
    for (int d = 0; d < 5; ++d) {
      if (kv.shape[d] != 1 && kv.strides[d] != want[d]) return false;
    }
    return true;
  };
  const bool keys_transposed =
      py::hasattr(obj, kKeysTransposedAttr) && py::bool_(obj.attr(kKeysTransposedAttr));
  if (keys_transposed) {  // the strides of head- or page-major, the mark saying which K pages
    if (matches(KvLayout::kHeadMajor)) {
      v.layout = KvLayout::kHeadMajorKT;
    } else if (matches(KvLayout::kPageMajor)) {
      v.layout = KvLayout::kPageMajorKT;
    } else {
      Check(absl::InvalidArgumentError(absl::StrCat(
          kv.Describe(), " is marked ", kKeysTransposedAttr, " but has strides [",
          absl::StrJoin(kv.strides, ", "),
          "], neither head- nor page-major (mempipe.attention.layout_view builds the view)")));
    }
  } else if (matches(KvLayout::kTokenMajor)) {
    return v;
  } else if (matches(KvLayout::kHeadMajor)) {
    v.layout = KvLayout::kHeadMajor;
  } else if (matches(KvLayout::kPageMajor)) {
    v.layout = KvLayout::kPageMajor;
  } else {
    Check(absl::InvalidArgumentError(absl::StrCat(
        kv.Describe(), " has strides [", absl::StrJoin(kv.strides, ", "),
        "]; expected a C-contiguous tensor (token-major) or, in host memory, a head-major view "
        "t.permute(0, 1, 3, 2, 4) of a contiguous [2, num_blocks, num_kv_heads, block_size, "
        "head_dim] tensor t, or a page-major view t.permute(2, 0, 3, 1, 4) of a contiguous "
        "[num_blocks, num_kv_heads, 2, block_size, head_dim] tensor t")));
  }
  if (!IsHostDevice(kv.device)) {
    Check(absl::UnimplementedError(absl::StrCat(
        kv.Describe(), " is a ", KvLayoutName(v.layout),
        "-major view in device memory; the GPU kernels read C-contiguous (token-major) caches "
        "only")));
  }
  return v;
}

void RequireSameDType(const BorrowedTensor& t, const KvCacheView& cache) {
  const DType d = ValueOrThrow(t.FloatDType());
  if (d != cache.dtype) {
    Check(absl::InvalidArgumentError(absl::StrCat(t.name, " must have the cache dtype ",
                                                  DTypeName(cache.dtype), ", got ", DTypeName(d))));
  }
}

// A call's digests: one tensor (native), or the three of an int8 digest (module comment).
struct BorrowedDigests {
  BorrowedTensor data;  // native: the digests; int8: the codes
  std::optional<BorrowedTensor> scales;
  std::optional<BorrowedTensor> exact;

  bool int8() const { return scales.has_value(); }
};

// A tensor (anything with __dlpack__) is a native digest; an object with `codes` an int8 one,
// which must also have `scales` and `exact`.
BorrowedDigests BorrowDigests(const py::handle& obj) {
  BorrowedDigests d;
  if (py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "codes")) {
    d.data = Borrow(obj, "digests");
    return d;
  }
  for (const char* attr : {"scales", "exact"}) {
    if (!py::hasattr(obj, attr)) {
      Check(absl::InvalidArgumentError(absl::StrCat(
          "digests: an int8 digest needs the tensors codes, scales and exact (got a ",
          std::string(py::str(py::type::of(obj).attr("__name__"))), " without '", attr, "')")));
    }
  }
  d.data = Borrow(obj.attr("codes"), "digests.codes");
  d.scales = Borrow(obj.attr("scales"), "digests.scales");
  d.exact = Borrow(obj.attr("exact"), "digests.exact");
  return d;
}

// The int8 digest's scales and exact rows on the codes' device (ResolveTarget checks the codes).
void RequireDigestDevice(const BorrowedDigests& d) {
  if (!d.int8()) return;
  RequireSameDevice(d.data, *d.scales);
  RequireSameDevice(d.data, *d.exact);
}

// [num_blocks, 2, KVH, D] of `cache`'s geometry.
void CheckDigestRows(const BorrowedTensor& t, const KvCacheView& cache) {
  Check(t.RequireRank(4));
  Check(t.RequireDim(0, cache.num_blocks, "num_blocks"));
  Check(t.RequireDim(1, 2, "max and min"));
  Check(t.RequireDim(2, cache.num_kv_heads, "num_kv_heads"));
  Check(t.RequireDim(3, cache.head_dim, "head_dim"));
}

// Converts digests matching `cache`: native [num_blocks, 2, KVH, D] in the cache dtype, or
// int8 codes of that shape + scales [num_blocks, KVH] float32 + exact rows in the cache dtype.
DigestView DigestsView(const BorrowedDigests& d, const KvCacheView& cache) {
  const BorrowedTensor& dg = d.data;
  CheckDigestRows(dg, cache);
  if (!d.int8()) {
    RequireSameDType(dg, cache);
    return DigestView{dg.data, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
  }
  Check(dg.RequireType(ElemType::kInt8));
  const BorrowedTensor& sc = *d.scales;
  Check(sc.RequireRank(2));
  Check(sc.RequireType(ElemType::kFloat32));
  Check(sc.RequireDim(0, cache.num_blocks, "num_blocks"));
  Check(sc.RequireDim(1, cache.num_kv_heads, "num_kv_heads"));
  const BorrowedTensor& ex = *d.exact;
  CheckDigestRows(ex, cache);
  RequireSameDType(ex, cache);
  DigestView v{dg.data, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
  v.format = DigestFormat::kInt8;
  v.scales = static_cast<float*>(sc.data);
  v.exact = ex.data;
  return v;
}

BlockTableView TableView(const BorrowedTensor& bt, const BorrowedTensor& lens) {
  Check(bt.RequireRank(2));
  Check(bt.RequireType(ElemType::kInt32));
  Check(lens.RequireRank(1));
  Check(lens.RequireType(ElemType::kInt32));
  Check(lens.RequireDim(0, bt.shape[0], "num_seqs, rows of block_table"));
  return BlockTableView{static_cast<const int32_t*>(bt.data),
                        static_cast<const int32_t*>(lens.data), static_cast<int>(bt.shape[0]),
                        static_cast<int>(bt.shape[1])};
}

// Token rows [T, KVH, D] in the cache dtype, T = slot_mapping's length.
void CheckTokenRows(const BorrowedTensor& rows, const BorrowedTensor& slots,
                    const KvCacheView& cache) {
  Check(rows.RequireRank(3));
  Check(rows.RequireDim(0, slots.shape[0], "tokens, length of slot_mapping"));
  Check(rows.RequireDim(1, cache.num_kv_heads, "num_kv_heads"));
  Check(rows.RequireDim(2, cache.head_dim, "head_dim"));
  RequireSameDType(rows, cache);
}

// key or value [tokens, KVH, D] as the cache takes them, borrowed with their strides: on the
// host each token's row may lie anywhere after the previous one's (a column slice of a fused
// qkv output, as vLLM passes them), a row's heads packed; on a GPU, C-contiguous. Returns the
// row stride in elements for WriteKv (0: packed).
int64_t TokenRowStride(const BorrowedTensor& rows, const BorrowedTensor& slots,
                       const KvCacheView& cache, bool host) {
  CheckTokenRows(rows, slots, cache);
  const int64_t row = static_cast<int64_t>(cache.num_kv_heads) * cache.head_dim;
  const auto& st = rows.strides;
  const bool heads_packed =
      (rows.shape[2] == 1 || st[2] == 1) && (rows.shape[1] == 1 || st[1] == cache.head_dim);
  const int64_t stride = rows.shape[0] <= 1 ? row : st[0];
  if (heads_packed && stride == row) return 0;
  if (heads_packed && host && stride > row) return stride;
  Check(absl::InvalidArgumentError(absl::StrCat(
      rows.Describe(), " has strides [", absl::StrJoin(st, ", "), "]; expected each token's ",
      cache.num_kv_heads, " x ", cache.head_dim, " elements packed (strides [", host ? "s >= " : "",
      row, ", ", cache.head_dim, ", 1])", host ? "" : " on the GPU", " (call .contiguous())")));
  return 0;
}

void CheckSlots(const BorrowedTensor& slots) {
  Check(slots.RequireRank(1));
  Check(slots.RequireType(ElemType::kInt64));
}

// A host kernel's num_threads argument: at least 1 (the C++ steps would take fewer as 1; a
// caller that passed 0 or a negative count meant something else and is told so).
int ThreadsArg(int num_threads) {
  if (num_threads < 1) {
    Check(absl::InvalidArgumentError(absl::StrCat("num_threads must be >= 1, got ", num_threads)));
  }
  return num_threads;
}

// query/out of [rows, H, D]; `out` must match query in shape and dtype.
DecodeIo IoView(const BorrowedTensor& q, const BorrowedTensor& out, int num_threads) {
  Check(q.RequireRank(3));
  Check(out.RequireRank(3));
  for (int d = 0; d < 3; ++d) Check(out.RequireDim(d, q.shape[d], "the query's size"));
  DecodeIo io;
  io.query = q.data;
  io.out = out.data;
  io.dtype = ValueOrThrow(q.FloatDType());
  if (ValueOrThrow(out.FloatDType()) != io.dtype) {
    Check(absl::InvalidArgumentError(
        absl::StrCat("out must have the query's dtype ", DTypeName(io.dtype))));
  }
  io.num_seqs = static_cast<int>(q.shape[0]);
  io.num_heads = static_cast<int>(q.shape[1]);
  io.head_dim = static_cast<int>(q.shape[2]);
  io.num_threads = ThreadsArg(num_threads);
  return io;
}

QueryView QueryOf(const BorrowedTensor& q) {
  Check(q.RequireRank(3));
  return QueryView{q.data, ValueOrThrow(q.FloatDType()), static_cast<int>(q.shape[0]),
                   static_cast<int>(q.shape[1]), static_cast<int>(q.shape[2])};
}

// pages [S, KVH, max_selected] and counts [S, KVH], int32.
SelectionView SelectionOf(const BorrowedTensor& pages, const BorrowedTensor& counts, int num_seqs,
                          int num_kv_heads) {
  Check(pages.RequireRank(3));
  Check(pages.RequireType(ElemType::kInt32));
  Check(pages.RequireDim(0, num_seqs, "num_seqs"));
  Check(pages.RequireDim(1, num_kv_heads, "num_kv_heads"));
  Check(counts.RequireRank(2));
  Check(counts.RequireType(ElemType::kInt32));
  Check(counts.RequireDim(0, num_seqs, "num_seqs"));
  Check(counts.RequireDim(1, num_kv_heads, "num_kv_heads"));
  return SelectionView{static_cast<int32_t*>(pages.data), static_cast<int32_t*>(counts.data),
                       num_seqs, num_kv_heads, static_cast<int>(pages.shape[2])};
}

SelectionConfig ConfigOf(int budget, int sinks, int locals, const std::string& aggregation) {
  SelectionConfig c;
  c.budget_tokens = budget;
  c.num_sink_pages = sinks;
  c.num_local_pages = locals;
  c.aggregation = ValueOrThrow(ParseGroupAggregation(aggregation));
  return c;
}

// Runs `fn` (returning absl::Status) without the GIL, then raises its error, if any.
template <typename Fn>
void RunReleased(Fn&& fn) {
  absl::Status status;
  {
    py::gil_scoped_release release;
    status = fn();
  }
  Check(status);
}

#ifdef MEMPIPE_MODULE_GPU
// Launches `fn` with the target's device current (the launchers plan for the current device).
template <typename Fn>
void RunOnGpu(const Target& target, Fn&& fn) {
  RunReleased([&]() -> absl::Status {
    absl::StatusOr<ScopedDevice> guard = ScopedDevice::Enter(target.device);
    if (!guard.ok()) return guard.status();
    return fn();
  });
}
#endif

// The caller's GPU scratch memory: a uint8 tensor on the call's device with at least `need`
// bytes (None is accepted when nothing is needed). Ignored on the CPU.
struct Scratch {
  void* data = nullptr;
  size_t bytes = 0;
};

Scratch ScratchOf(const py::object& workspace, const Target& target, size_t need,
                  const char* function, const char* size_function) {
  if (!target.gpu) return {};
  if (workspace.is_none()) {
    if (need == 0) return {};
    Check(absl::InvalidArgumentError(absl::StrCat(
        function, " on cuda:", target.device, " needs workspace=, a uint8 tensor of at least ",
        need, " bytes on that device (mempipe.steps.", size_function, ")")));
  }
  BorrowedTensor ws = Borrow(workspace, "workspace");
  if (ws.device.device_type != kDLCUDA || ws.device.device_id != target.device) {
    Check(absl::InvalidArgumentError(absl::StrCat(ws.Describe(), " must be on cuda:", target.device,
                                                  " with the other tensors")));
  }
  Check(ws.RequireType(ElemType::kUInt8));
  const auto bytes = static_cast<size_t>(ws.NumElems());
  if (bytes < need) {
    Check(absl::InvalidArgumentError(absl::StrCat(ws.Describe(), " holds ", bytes, " bytes; ",
                                                  function, " needs ", need, " (mempipe.steps.",
                                                  size_function, ")")));
  }
  return Scratch{ws.data, bytes};
}

size_t DecodeScratchBytes(const Target& target, int num_seqs, int num_heads, int num_kv_heads,
                          int max_items) {
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    const ScopedDevice guard = ValueOrThrow(ScopedDevice::Enter(target.device));
    return PagedDecodeWorkspaceBytes(num_seqs, num_heads, num_kv_heads, max_items);
  }
#endif
  (void)target, (void)num_seqs, (void)num_heads, (void)num_kv_heads, (void)max_items;
  return 0;
}

size_t SelectScratchBytes(const Target& target, const BlockTableView& table, int num_kv_heads) {
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) return SelectWorkspaceBytes(table, num_kv_heads);
#endif
  (void)target, (void)table, (void)num_kv_heads;
  return 0;
}

// The when_zero= / when_nonzero= switch of a launch: an int32 [1] tensor. A host tensor is read
// here (the call does nothing unless it holds); one on the call's CUDA device becomes a
// DevicePredicate that the kernels read, so no host reads it (the offload's fallback).
struct RunSwitch {
  bool host_skip = false;
  const int32_t* device_flag = nullptr;
  bool run_when_zero = true;
};

RunSwitch RunSwitchOf(const py::object& when_zero, const py::object& when_nonzero,
                      const Target& target, const char* function) {
  RunSwitch r;
  if (when_zero.is_none() && when_nonzero.is_none()) return r;
  if (!when_zero.is_none() && !when_nonzero.is_none()) {
    Check(absl::InvalidArgumentError(
        absl::StrCat(function, ": pass when_zero= or when_nonzero=, not both")));
  }
  r.run_when_zero = !when_zero.is_none();
  BorrowedTensor flag = Borrow(r.run_when_zero ? when_zero : when_nonzero,
                               r.run_when_zero ? "when_zero" : "when_nonzero");
  Check(flag.RequireType(ElemType::kInt32));
  if (flag.NumElems() != 1) {
    Check(absl::InvalidArgumentError(
        absl::StrCat(flag.Describe(), " must hold exactly one int32 value")));
  }
  if (IsHostDevice(flag.device)) {
    const int32_t v = *static_cast<const int32_t*>(flag.data);
    r.host_skip = (v == 0) != r.run_when_zero;
    return r;
  }
  if (!target.gpu || flag.device.device_type != kDLCUDA || flag.device.device_id != target.device) {
    Check(absl::InvalidArgumentError(
        absl::StrCat(flag.Describe(), " must be a host tensor or on the call's device ",
                     target.gpu ? absl::StrCat("cuda:", target.device) : std::string("cpu"))));
  }
  r.device_flag = static_cast<const int32_t*>(flag.data);
  return r;
}

#ifdef MEMPIPE_MODULE_GPU
DevicePredicate DevicePredicateOf(const RunSwitch& r) {
  return DevicePredicate{r.device_flag, r.run_when_zero};
}
#endif

void WriteKvPy(py::handle kv_cache, py::handle slot_mapping, py::handle key, py::handle value,
               const py::object& stream) {
  auto kv = BorrowCache(kv_cache), slots = Borrow(slot_mapping, "slot_mapping"),
       k = BorrowStrided(key, "key"), v = BorrowStrided(value, "value");
  [[maybe_unused]] const Target target = ResolveTarget({&kv, &slots, &k, &v}, stream);
  NoGpuKernel(target, "write_kv", "append_kv_and_digests writes the cache with the digests");
  const KvCacheView cache = CacheView(kv, kv_cache);
  CheckSlots(slots);
  const int64_t ks = TokenRowStride(k, slots, cache, true),
                vs = TokenRowStride(v, slots, cache, true);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
  RunReleased([&] { return WriteKv(cache, s, n, k.data, v.data, ks, vs); });
}

size_t AppendScratchBytes(const Target& target, const KvCacheView& cache) {
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) return AppendWorkspaceBytes(cache);
#endif
  (void)target, (void)cache;
  return 0;
}

void AppendKvAndDigestsPy(py::handle kv_cache, py::handle slot_mapping, py::handle key,
                          py::handle value, py::handle digests,
                          [[maybe_unused]] const py::object& workspace, const py::object& stream) {
  auto kv = BorrowCache(kv_cache), slots = Borrow(slot_mapping, "slot_mapping"),
       k = BorrowStrided(key, "key"), v = BorrowStrided(value, "value");
  const BorrowedDigests dg = BorrowDigests(digests);
  [[maybe_unused]] const Target target = ResolveTarget({&kv, &slots, &k, &v, &dg.data}, stream);
  RequireDigestDevice(dg);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  CheckSlots(slots);
  const bool host = !target.gpu;
  const int64_t ks = TokenRowStride(k, slots, cache, host),
                vs = TokenRowStride(v, slots, cache, host);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    // workspace=None: bookkeeping from the stream-ordered pool (addresses vary per call); a
    // caller-owned workspace keeps them fixed (CUDA-graph capture; DecodePlan owns one).
    if (workspace.is_none()) {
      RunOnGpu(target, [&] {
        return AppendKvAndDigestsGpu(cache, s, n, k.data, v.data, dv, target.stream);
      });
    } else {
      const Scratch ws = ScratchOf(workspace, target, AppendScratchBytes(target, cache),
                                   "append_kv_and_digests", "append_workspace_bytes");
      RunOnGpu(target, [&] {
        return AppendKvAndDigestsGpu(cache, s, n, k.data, v.data, dv, ws.data, ws.bytes,
                                     target.stream);
      });
    }
    return;
  }
#endif
  RunReleased([&] { return AppendKvAndDigests(cache, s, n, k.data, v.data, dv, ks, vs); });
}

void UpdateDigestsPy(py::handle kv_cache, py::handle slot_mapping, py::handle digests,
                     const py::object& stream) {
  auto kv = BorrowCache(kv_cache), slots = Borrow(slot_mapping, "slot_mapping");
  const BorrowedDigests dg = BorrowDigests(digests);
  [[maybe_unused]] const Target target = ResolveTarget({&kv, &slots, &dg.data}, stream);
  RequireDigestDevice(dg);
  NoGpuKernel(target, "update_digests",
              "append_kv_and_digests updates them with the write, build_digests in bulk");
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  CheckSlots(slots);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
  RunReleased([&] { return UpdateDigests(cache, s, n, dv); });
}

void BuildDigestsPy(py::handle kv_cache, py::handle block_table, py::handle seq_lens,
                    py::handle digests, const py::object& stream) {
  auto kv = BorrowCache(kv_cache), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens");
  const BorrowedDigests dg = BorrowDigests(digests);
  [[maybe_unused]] const Target target = ResolveTarget({&kv, &bt, &lens, &dg.data}, stream);
  RequireDigestDevice(dg);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target, [&] { return BuildDigestsGpu(cache, table, dv, target.stream); });
    return;
  }
#endif
  RunReleased([&] { return BuildDigests(cache, table, dv); });
}

void ComputeRelevancyPy(py::handle query, py::handle kv_cache, py::handle digests,
                        py::handle block_table, py::handle seq_lens, py::handle scores,
                        const std::string& aggregation, int num_threads, const py::object& stream) {
  const int threads = ThreadsArg(num_threads);
  auto q = Borrow(query, "query"), kv = BorrowCache(kv_cache),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       sc = Borrow(scores, "scores");
  const BorrowedDigests dg = BorrowDigests(digests);
  [[maybe_unused]] const Target target =
      ResolveTarget({&q, &kv, &dg.data, &bt, &lens, &sc}, stream);
  RequireDigestDevice(dg);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
  const QueryView qv = QueryOf(q);
  Check(sc.RequireRank(3));
  Check(sc.RequireType(ElemType::kFloat32));
  Check(sc.RequireDim(0, table.num_seqs, "num_seqs"));
  Check(sc.RequireDim(1, cache.num_kv_heads, "num_kv_heads"));
  Check(sc.RequireDim(2, table.max_blocks_per_seq, "max_blocks_per_seq"));
  const GroupAggregation agg = ValueOrThrow(ParseGroupAggregation(aggregation));
  auto* out = static_cast<float*>(sc.data);
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target,
             [&] { return ComputeRelevancyGpu(qv, cache, dv, table, agg, out, target.stream); });
    return;
  }
#endif
  RunReleased([&] { return ComputeRelevancy(qv, cache, dv, table, agg, out, threads); });
}

void SelectPagesPy(py::handle scores, py::handle block_table, py::handle seq_lens, int block_size,
                   py::handle pages, py::handle counts, int budget, int sinks, int locals,
                   int num_threads, const py::object& stream) {
  const int threads = ThreadsArg(num_threads);
  auto sc = Borrow(scores, "scores"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), pg = Borrow(pages, "pages"),
       ct = Borrow(counts, "counts");
  [[maybe_unused]] const Target target = ResolveTarget({&sc, &bt, &lens, &pg, &ct}, stream);
  const BlockTableView table = TableView(bt, lens);
  Check(sc.RequireRank(3));
  Check(sc.RequireType(ElemType::kFloat32));
  Check(sc.RequireDim(0, table.num_seqs, "num_seqs"));
  Check(sc.RequireDim(2, table.max_blocks_per_seq, "max_blocks_per_seq"));
  const int kv_heads = static_cast<int>(sc.shape[1]);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, kv_heads);
  // Aggregation is a scoring option; selection reads scores only.
  const SelectionConfig config = ConfigOf(budget, sinks, locals, "max");
  const auto* s = static_cast<const float*>(sc.data);
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target, [&] {
      return SelectPagesGpu(s, table, block_size, kv_heads, config, sel, target.stream);
    });
    return;
  }
#endif
  RunReleased([&] { return SelectPages(s, table, block_size, kv_heads, config, sel, threads); });
}

void ScoreAndSelectPy(py::handle query, py::handle kv_cache, py::handle digests,
                      py::handle block_table, py::handle seq_lens, py::handle pages,
                      py::handle counts, int budget, int sinks, int locals,
                      const std::string& aggregation, int num_threads, const py::object& workspace,
                      const py::object& stream, const py::object& when_zero,
                      const py::object& when_nonzero) {
  const int threads = ThreadsArg(num_threads);
  auto q = Borrow(query, "query"), kv = BorrowCache(kv_cache),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       pg = Borrow(pages, "pages"), ct = Borrow(counts, "counts");
  const BorrowedDigests dg = BorrowDigests(digests);
  [[maybe_unused]] const Target target =
      ResolveTarget({&q, &kv, &dg.data, &bt, &lens, &pg, &ct}, stream);
  RequireDigestDevice(dg);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
  const QueryView qv = QueryOf(q);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, cache.num_kv_heads);
  const SelectionConfig config = ConfigOf(budget, sinks, locals, aggregation);
  const Scratch ws =
      ScratchOf(workspace, target, SelectScratchBytes(target, table, cache.num_kv_heads),
                "score_and_select", "select_workspace_bytes");
  const RunSwitch run = RunSwitchOf(when_zero, when_nonzero, target, "score_and_select");
  if (run.host_skip) return;
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target, [&] {
      return ScoreAndSelectGpu(qv, cache, dv, table, config, sel, ws.data, ws.bytes, target.stream,
                               DevicePredicateOf(run));
    });
    return;
  }
#endif
  (void)ws;
  RunReleased([&] { return ScoreAndSelect(qv, cache, dv, table, config, sel, threads); });
}

// Steps 2-4 of a sparse decode layer on host tensors in one call (backend/host_sparse_layer.h).
void ScoreSelectDecodePy(py::handle query, py::handle kv_cache, py::handle digests,
                         py::handle block_table, py::handle seq_lens, py::handle pages,
                         py::handle counts, py::handle out, float scale, int budget, int sinks,
                         int locals, const std::string& aggregation, int num_threads,
                         const py::object& stream) {
  auto q = Borrow(query, "query"), kv = BorrowCache(kv_cache),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       pg = Borrow(pages, "pages"), ct = Borrow(counts, "counts"), o = Borrow(out, "out");
  const BorrowedDigests dg = BorrowDigests(digests);
  const Target target = ResolveTarget({&q, &kv, &dg.data, &bt, &lens, &pg, &ct, &o}, stream);
  NoGpuKernel(target, "score_select_decode",
              "call score_and_select, then sparse_decode, on the device");
  RequireDigestDevice(dg);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, cache.num_kv_heads);
  const SelectionConfig config = ConfigOf(budget, sinks, locals, aggregation);
  RunReleased([&] { return HostSparseLayer(io, cache, dv, table, config, sel, scale); });
}

void DenseDecodePy(py::handle query, py::handle kv_cache, py::handle block_table,
                   py::handle seq_lens, py::handle out, float scale, int num_threads,
                   const py::object& workspace, const py::object& stream,
                   const py::object& when_zero, const py::object& when_nonzero) {
  auto q = Borrow(query, "query"), kv = BorrowCache(kv_cache),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       o = Borrow(out, "out");
  [[maybe_unused]] const Target target = ResolveTarget({&q, &kv, &bt, &lens, &o}, stream);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  const Scratch ws = ScratchOf(workspace, target,
                               DecodeScratchBytes(target, io.num_seqs, io.num_heads,
                                                  cache.num_kv_heads, table.max_blocks_per_seq),
                               "dense_decode", "decode_workspace_bytes");
  const RunSwitch run = RunSwitchOf(when_zero, when_nonzero, target, "dense_decode");
  if (run.host_skip) return;
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target, [&] {
      return DenseDecodeGpu(io, cache, table, scale, ws.data, ws.bytes, target.stream,
                            DevicePredicateOf(run));
    });
    return;
  }
#endif
  (void)ws;
  RunReleased([&] { return DenseDecode(io, cache, table, scale); });
}

void SparseDecodePy(py::handle query, py::handle kv_cache, py::handle block_table,
                    py::handle seq_lens, py::handle pages, py::handle counts, py::handle out,
                    float scale, int num_threads, const py::object& workspace,
                    const py::object& stream, const py::object& when_zero,
                    const py::object& when_nonzero) {
  auto q = Borrow(query, "query"), kv = BorrowCache(kv_cache),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       pg = Borrow(pages, "pages"), ct = Borrow(counts, "counts"), o = Borrow(out, "out");
  [[maybe_unused]] const Target target = ResolveTarget({&q, &kv, &bt, &lens, &pg, &ct, &o}, stream);
  const KvCacheView cache = CacheView(kv, kv_cache);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, cache.num_kv_heads);
  const PageList list{sel.pages, sel.counts, sel.num_kv_heads, sel.max_selected};
  const Scratch ws = ScratchOf(
      workspace, target,
      DecodeScratchBytes(target, io.num_seqs, io.num_heads, cache.num_kv_heads, sel.max_selected),
      "sparse_decode", "decode_workspace_bytes");
  const RunSwitch run = RunSwitchOf(when_zero, when_nonzero, target, "sparse_decode");
  if (run.host_skip) return;
#ifdef MEMPIPE_MODULE_GPU
  if (target.gpu) {
    RunOnGpu(target, [&] {
      return SparseDecodeGpu(io, cache, table, list, scale, ws.data, ws.bytes, target.stream,
                             DevicePredicateOf(run));
    });
    return;
  }
#endif
  (void)ws;
  RunReleased([&] { return SparseDecode(io, cache, table, list, scale); });
}

void PrefillAttentionPy(py::handle query, py::handle query_start_loc, py::handle kv_cache,
                        py::handle block_table, py::handle seq_lens, py::handle out, float scale,
                        int num_threads, const py::object& stream) {
  auto q = Borrow(query, "query"), qsl = Borrow(query_start_loc, "query_start_loc"),
       kv = BorrowCache(kv_cache), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), o = Borrow(out, "out");
  [[maybe_unused]] const Target target = ResolveTarget({&q, &qsl, &kv, &bt, &lens, &o}, stream);
  NoGpuKernel(target, "prefill_attention",
              "mempipe.attention.PagedLayer.prefill runs torch SDPA on CUDA tensors");
  const KvCacheView cache = CacheView(kv, kv_cache);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  Check(qsl.RequireRank(1));
  Check(qsl.RequireType(ElemType::kInt32));
  Check(qsl.RequireDim(0, table.num_seqs + 1, "num_seqs + 1"));
  const auto* starts = static_cast<const int32_t*>(qsl.data);
  RunReleased([&] { return PrefillAttention(io, starts, cache, table, scale); });
}

// Workspace sizes for the GPU launchers (0 where one split needs none); the decode size
// depends on the device's SM count, so `device` names the CUDA device it is for.
size_t DecodeWorkspaceBytesPy(int num_seqs, int num_heads, int num_kv_heads, int max_items,
                              int device) {
  if (!kGpuBuild) Check(absl::UnimplementedError("this build of mempipe has no GPU kernels"));
  for (auto [v, what] :
       {std::pair{num_seqs, "num_seqs"}, std::pair{num_heads, "num_heads"},
        std::pair{num_kv_heads, "num_kv_heads"}, std::pair{max_items, "max_items"}}) {
    if (v < 0) Check(absl::InvalidArgumentError(absl::StrCat(what, " must be >= 0, got ", v)));
  }
  Target t;
  t.gpu = true;
  t.device = device;
  return DecodeScratchBytes(t, num_seqs, num_heads, num_kv_heads, max_items);
}

size_t SelectWorkspaceBytesPy(int num_seqs, int num_kv_heads, int max_blocks_per_seq) {
  if (!kGpuBuild) Check(absl::UnimplementedError("this build of mempipe has no GPU kernels"));
  for (auto [v, what] : {std::pair{num_seqs, "num_seqs"}, std::pair{num_kv_heads, "num_kv_heads"},
                         std::pair{max_blocks_per_seq, "max_blocks_per_seq"}}) {
    if (v < 0) Check(absl::InvalidArgumentError(absl::StrCat(what, " must be >= 0, got ", v)));
  }
  Target t;
  t.gpu = true;
  return SelectScratchBytes(t, BlockTableView{nullptr, nullptr, num_seqs, max_blocks_per_seq},
                            num_kv_heads);
}

size_t AppendWorkspaceBytesPy(int num_blocks) {
  if (!kGpuBuild) Check(absl::UnimplementedError("this build of mempipe has no GPU kernels"));
  if (num_blocks < 0) {
    Check(absl::InvalidArgumentError(absl::StrCat("num_blocks must be >= 0, got ", num_blocks)));
  }
  Target t;
  t.gpu = true;
  KvCacheView cache;
  cache.num_blocks = num_blocks;
  return AppendScratchBytes(t, cache);
}

// ---- the selection-offload engine (backend/selection_offload.h) ------------------------------

// U55cParams fields a `params` dict may set (the rest keep their defaults).
void ApplyU55cParams(const py::object& params, U55cParams& p) {
  if (params.is_none()) return;
  if (!py::isinstance<py::dict>(params)) {
    Check(absl::InvalidArgumentError("params must be None or a dict of U55C model parameters"));
  }
  const std::map<std::string, int*> ints = {{"num_cus", &p.num_cus},
                                            {"hbm_channels", &p.hbm_channels},
                                            {"pipeline_fill_clocks", &p.pipeline_fill_clocks},
                                            {"row_fill_clocks", &p.row_fill_clocks},
                                            {"score_heads_per_clock", &p.score_heads_per_clock},
                                            {"score_fifo_pages", &p.score_fifo_pages},
                                            {"score_add_stages", &p.score_add_stages},
                                            {"rtl_cus_that_fit", &p.rtl_cus_that_fit}};
  const std::map<std::string, double*> doubles = {
      {"hbm_channel_bytes", &p.hbm_channel_bytes},
      {"hbm_channel_peak_bps", &p.hbm_channel_peak_bps},
      {"hbm_efficiency", &p.hbm_efficiency},
      {"kernel_clock_hz", &p.kernel_clock_hz},
      {"rtl_clock_estimate_hz", &p.rtl_clock_estimate_hz},
      {"select_clocks_per_page", &p.select_clocks_per_page},
      {"launch_latency_s", &p.launch_latency_s},
      {"per_cu_start_s", &p.per_cu_start_s},
      {"dma_to_card_bps", &p.dma_to_card_bps},
      {"dma_from_card_bps", &p.dma_from_card_bps},
      {"dma_transfer_overhead_s", &p.dma_transfer_overhead_s},
      {"dma_small_to_card_bps", &p.dma_small_to_card_bps},
      {"dma_small_from_card_bps", &p.dma_small_from_card_bps},
      {"dma_small_knee_bytes", &p.dma_small_knee_bytes},
      {"board_power_active_w", &p.board_power_active_w},
      {"board_power_idle_w", &p.board_power_idle_w}};
  for (auto [key, value] : params.cast<py::dict>()) {
    const std::string name = py::str(key);
    if (name == "vitis_target_what_if") {  // the labelled what-if (U55cParams::VitisTarget)
      p.vitis_target_what_if = value.cast<bool>();
    } else if (auto it = ints.find(name); it != ints.end()) {
      *it->second = value.cast<int>();
    } else if (auto jt = doubles.find(name); jt != doubles.end()) {
      *jt->second = value.cast<double>();
    } else {
      std::vector<std::string> known;
      for (const auto& [k, v] : ints) known.push_back(k);
      for (const auto& [k, v] : doubles) known.push_back(k);
      known.push_back("vitis_target_what_if");
      Check(absl::InvalidArgumentError(absl::StrCat("unknown U55C parameter '", name,
                                                    "'; known: ", absl::StrJoin(known, ", "))));
    }
  }
}

py::dict MetricsDict(const OffloadMetrics& m, const std::string& functional, double gpu_wait_ms) {
  py::dict d;
  d["selector"] = m.selector;
  d["functional"] = functional;
  d["requests"] = m.requests;
  py::dict published, waited, fallbacks;
  int64_t fallback_total = 0;
  for (int r = 0; r < kNumOffloadReasons; ++r) {
    const std::string name(OffloadReasonName(static_cast<OffloadReason>(r)));
    published[py::str(name)] = m.published[r];
    waited[py::str(name)] = m.waited[r];
    if (r != 0) {
      fallbacks[py::str(name)] = m.waited[r];
      fallback_total += m.waited[r];
    }
  }
  d["published"] = published;
  d["waits"] = m.waits;
  d["waited"] = waited;
  d["fallbacks"] = fallbacks;
  d["fallback_total"] = fallback_total;
  d["appends"] = m.appends;
  d["appended_tokens"] = m.appended_tokens;
  d["host_bound"] = m.host_bound;
  d["late_timeouts"] = m.late_timeouts;
  d["append_ring"] = m.append_ring;
  d["selector_ms"] = m.selector_ms;
  d["functional_ms"] = m.functional_ms;
  d["append_ms"] = m.append_ms;
  d["modeled_device_ms"] = m.modeled_device_ms;
  d["modeled_energy_mj"] = m.modeled_energy_mj;
  d["modeled_bytes_to_card"] = m.bytes_to_card;
  d["modeled_bytes_from_card"] = m.bytes_from_card;
  d["bytes_d2h"] = m.bytes_d2h;
  d["bytes_h2d"] = m.bytes_h2d;
  d["gpu_wait_ms"] = gpu_wait_ms;
  d["dead"] = m.dead;
  d["death"] = m.death;
  return d;
}

// off = SelectionOffload(device="cpu", fpga_backend="emulated", paced=True,
//                        functional="reference", deadline_ms=100.0, slots=64, threads=0,
//                        params=None, dead_after_failures=3, gate_timeout_ms=0.0,
//                        append_ring=8, append_timeout_ms=10000.0)
class SelectionOffloadPy {
 public:
  SelectionOffloadPy(const std::string& device, const std::string& fpga_backend, bool paced,
                     const std::string& functional, double deadline_ms, int slots, int threads,
                     const py::object& params, int dead_after_failures, double gate_timeout_ms,
                     int append_ring, double append_timeout_ms) {
    if (device == "cpu") {
      gpu_ = false;
    } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
      if (!kGpuBuild) {
        Check(absl::UnimplementedError(
            absl::StrCat("device '", device,
                         "': this build of mempipe has no GPU kernels (devices = ('cpu',))")));
      }
      gpu_ = true;
      if (device.size() > 5) {
        try {
          device_ = std::stoi(device.substr(5));
        } catch (const std::exception&) {
          Check(absl::InvalidArgumentError(absl::StrCat("bad device '", device, "'")));
        }
      }
    } else {
      Check(absl::InvalidArgumentError(
          absl::StrCat("device must be 'cpu', 'cuda' or 'cuda:N', got '", device, "'")));
    }
    if (threads < 0) {
      Check(absl::InvalidArgumentError(absl::StrCat("threads must be >= 0, got ", threads)));
    }
    FpgaOptions o;
    o.backend = ValueOrThrow(ParseFpgaBackend(fpga_backend));
    o.paced = paced;
    o.functional = ValueOrThrow(ParseEmulatedFunctional(functional));
    o.reference_threads =
        threads > 0 ? threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    ApplyU55cParams(params, o.params);
    functional_ = o.backend == FpgaBackend::kXrt ? "xrt" : functional;
    SelectionOffloadOptions eo;
    eo.slots = slots;
    eo.deadline_ms = deadline_ms;
    eo.dead_after_failures = dead_after_failures;
    eo.gate_timeout_ms = gate_timeout_ms;
    eo.append_ring = append_ring;
    eo.append_timeout_ms = append_timeout_ms;
    Check(ValidateSelectionOffloadOptions(eo));
    std::unique_ptr<PageSelector> selector = ValueOrThrow(MakeFpgaSelector(o));
#ifdef MEMPIPE_MODULE_GPU
    if (gpu_) {
      const ScopedDevice guard = ValueOrThrow(ScopedDevice::Enter(device_));
      gpu_engine_ = ValueOrThrow(GpuSelectionOffload::Create(std::move(selector), eo));
      return;
    }
#endif
    cpu_engine_ = ValueOrThrow(SelectionOffload::Create(std::move(selector), eo));
  }

  void AddLayer(int layer, py::handle kv_cache, const std::string& digest_dtype) {
    auto kv = BorrowCache(kv_cache);
    const KvCacheView v = CacheView(kv, kv_cache);
    CacheShape shape{v.dtype, v.num_blocks, v.block_size, v.num_kv_heads, v.head_dim};
    shape.digest_format = ValueOrThrow(ParseDigestFormat(digest_dtype));
    RunReleased([&] { return Engine().AddLayer(layer, shape); });
    shapes_[layer] = shape;
  }

  void BuildDigests(int layer, py::handle kv_cache, py::handle block_table, py::handle seq_lens) {
    auto kv = BorrowCache(kv_cache), bt = Borrow(block_table, "block_table"),
         lens = Borrow(seq_lens, "seq_lens");
    const Target target = Resolve({&kv, &bt, &lens}, py::none());
    KvCacheView cache = CacheView(kv, kv_cache);
    BlockTableView table = TableView(bt, lens);
    if (!target.gpu) {
      RunReleased([&] { return Engine().BuildDigests(layer, cache, table); });
      return;
    }
#ifdef MEMPIPE_MODULE_GPU
    // Bulk, after prefill: the K plane, the table and the lengths come to the host once (a
    // host synchronization, documented; the per-step path is append()).
    std::vector<uint8_t> keys(cache.NumBytes() / 2);
    std::vector<int32_t> rows(static_cast<size_t>(table.num_seqs) * table.max_blocks_per_seq);
    std::vector<int32_t> lens_host(table.num_seqs);
    RunOnGpu(target, [&]() -> absl::Status {
      MEMPIPE_RETURN_IF_ERROR(CopyToHostSync(keys.data(), cache.data, keys.size(), target.stream));
      MEMPIPE_RETURN_IF_ERROR(CopyToHostSync(rows.data(), table.block_table,
                                             rows.size() * sizeof(int32_t), target.stream));
      MEMPIPE_RETURN_IF_ERROR(CopyToHostSync(lens_host.data(), table.seq_lens,
                                             lens_host.size() * sizeof(int32_t), target.stream));
      cache.data = keys.data();
      table.block_table = rows.data();
      table.seq_lens = lens_host.data();
      return Engine().BuildDigests(layer, cache, table);
    });
#endif
  }

  void Append(int layer, py::handle slot_mapping, py::handle key, const py::object& stream) {
    auto slots = Borrow(slot_mapping, "slot_mapping"), k = Borrow(key, "key");
    [[maybe_unused]] const Target target = Resolve({&slots, &k}, stream);
    const CacheShape& shape = ShapeOf(layer);
    CheckSlots(slots);
    Check(k.RequireRank(3));
    Check(k.RequireDim(0, slots.shape[0], "tokens, length of slot_mapping"));
    Check(k.RequireDim(1, shape.num_kv_heads, "num_kv_heads"));
    Check(k.RequireDim(2, shape.head_dim, "head_dim"));
    const DType d = ValueOrThrow(k.FloatDType());
    if (d != shape.dtype) {
      Check(
          absl::InvalidArgumentError(absl::StrCat("key must have layer ", layer, "'s cache dtype ",
                                                  DTypeName(shape.dtype), ", got ", DTypeName(d))));
    }
    const auto* s = static_cast<const int64_t*>(slots.data);
    const int n = static_cast<int>(slots.shape[0]);
#ifdef MEMPIPE_MODULE_GPU
    if (target.gpu) {
      RunOnGpu(target, [&] { return gpu_engine_->Append(layer, s, n, k.data, target.stream); });
      return;
    }
#endif
    RunReleased([&] { return cpu_engine_->Append(layer, s, n, k.data); });
  }

  void Submit(int slot, int layer, py::handle query, py::handle block_table, py::handle seq_lens,
              int budget, int sinks, int locals, const std::string& aggregation,
              const py::object& stream) {
    auto q = Borrow(query, "query"), bt = Borrow(block_table, "block_table"),
         lens = Borrow(seq_lens, "seq_lens");
    [[maybe_unused]] const Target target = Resolve({&q, &bt, &lens}, stream);
    ShapeOf(layer);
    const QueryView qv = QueryOf(q);
    const BlockTableView table = TableView(bt, lens);
    const SelectionConfig config = ConfigOf(budget, sinks, locals, aggregation);
#ifdef MEMPIPE_MODULE_GPU
    if (target.gpu) {
      RunOnGpu(target,
               [&] { return gpu_engine_->Submit(slot, layer, qv, table, config, target.stream); });
      return;
    }
#endif
    RunReleased([&] { return cpu_engine_->Submit(slot, layer, qv, table, config); });
  }

  void Wait(int slot, py::handle pages, py::handle counts, py::handle status,
            const py::object& stream) {
    auto pg = Borrow(pages, "pages"), ct = Borrow(counts, "counts"), st = Borrow(status, "status");
    [[maybe_unused]] const Target target = Resolve({&pg, &ct, &st}, stream);
    Check(pg.RequireRank(3));
    const SelectionView sel =
        SelectionOf(pg, ct, static_cast<int>(pg.shape[0]), static_cast<int>(pg.shape[1]));
    Check(st.RequireRank(1));
    Check(st.RequireType(ElemType::kInt32));
    Check(st.RequireDim(0, 1, "one status word"));
    auto* status_word = static_cast<int32_t*>(st.data);
#ifdef MEMPIPE_MODULE_GPU
    if (target.gpu) {
      RunOnGpu(target, [&] { return gpu_engine_->Wait(slot, sel, status_word, target.stream); });
      return;
    }
#endif
    RunReleased([&]() -> absl::Status {
      absl::StatusOr<OffloadReason> r = cpu_engine_->Wait(slot, sel);
      if (!r.ok()) return r.status();
      *status_word = static_cast<int32_t>(*r);
      return absl::OkStatus();
    });
  }

  py::dict Metrics() {
    double gpu_wait_ms = 0;
    OffloadMetrics m;
#ifdef MEMPIPE_MODULE_GPU
    if (gpu_) {
      const ScopedDevice guard = ValueOrThrow(ScopedDevice::Enter(device_));
      m = ValueOrThrow(gpu_engine_->Metrics(&gpu_wait_ms));
    }
#endif
    if (!gpu_) m = cpu_engine_->Metrics();
    return MetricsDict(m, functional_, gpu_wait_ms);
  }

  void ResetMetrics() {
#ifdef MEMPIPE_MODULE_GPU
    if (gpu_) {
      const ScopedDevice guard = ValueOrThrow(ScopedDevice::Enter(device_));
      Check(gpu_engine_->ResetMetrics());
      return;
    }
#endif
    cpu_engine_->ResetMetrics();
  }

  void Shutdown() {
    py::gil_scoped_release release;
#ifdef MEMPIPE_MODULE_GPU
    if (gpu_) {
      absl::StatusOr<ScopedDevice> guard = ScopedDevice::Enter(device_);
      gpu_engine_->Shutdown();
      return;
    }
#endif
    cpu_engine_->Shutdown();
  }

  std::string Device() const { return gpu_ ? absl::StrCat("cuda:", device_) : "cpu"; }
  const std::string& Functional() const { return functional_; }
  int Slots() { return Engine().slots(); }
  double DeadlineMs() { return Engine().deadline_ms(); }

 private:
  SelectionOffload& Engine() {
#ifdef MEMPIPE_MODULE_GPU
    if (gpu_) return gpu_engine_->engine();
#endif
    return *cpu_engine_;
  }

  const CacheShape& ShapeOf(int layer) const {
    auto it = shapes_.find(layer);
    if (it == shapes_.end()) {
      Check(absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " was not added (add_layer(layer, kv_cache) first)")));
    }
    return it->second;
  }

  // The call's tensors must be on the offload's device.
  Target Resolve(std::initializer_list<const BorrowedTensor*> tensors, const py::object& stream) {
    const Target t = ResolveTarget(tensors, stream);
    if (t.gpu != gpu_ || (gpu_ && t.device != device_)) {
      Check(absl::InvalidArgumentError(absl::StrCat(
          (*tensors.begin())->Describe(), " is not on this offload's device ", Device())));
    }
    return t;
  }

  bool gpu_ = false;
  int device_ = 0;
  std::string functional_;
  std::map<int, CacheShape> shapes_;
  std::unique_ptr<SelectionOffload> cpu_engine_;
#ifdef MEMPIPE_MODULE_GPU
  std::unique_ptr<GpuSelectionOffload> gpu_engine_;
#endif
};

}  // namespace
}  // namespace mempipe::bindings

PYBIND11_MODULE(_mempipe, m) {
  using namespace mempipe::bindings;  // NOLINT: the module body names every binding
  using py::arg;
  m.doc() = "mempipe: paged sparse-attention steps on caller-owned tensors (CPU or CUDA)";
  // The supported sizes and the sparsity rules come from the C++ definitions (core/paged_kv.h,
  // core/dtype.h, backend/policy.h); Python keeps no copy.
  m.attr("supported_block_sizes") = IntTuple(mempipe::kSupportedBlockSizes);
  m.attr("decode_chunk_tokens") = mempipe::kDecodeChunkTokens;
  m.attr("supported_head_dims") = IntTuple(mempipe::kSupportedHeadDims);
  m.attr("supported_gpu_group_sizes") = IntTuple(mempipe::kSupportedGpuGroupSizes);
  py::list dtypes;
  for (mempipe::DType d : mempipe::kSupportedDTypes) dtypes.append(std::string(DTypeName(d)));
  m.attr("supported_dtypes") = py::tuple(dtypes);
  m.def(
      "is_dense_layer",
      [](int layer, int dense_layers) {
        Check(mempipe::ValidateDenseLayers(dense_layers));
        return mempipe::IsDenseLayer(mempipe::SparsityPolicy{dense_layers, {}}, layer);
      },
      arg("layer"), arg("dense_layers"),
      "The dense-layers rule (backend/policy.h): True when `layer` always decodes densely.");
  py::list devices;
  devices.append("cpu");
  if (kGpuBuild) devices.append("cuda");
  m.attr("devices") = py::tuple(devices);
  m.attr("gpu") = kGpuBuild;

  const auto stream = arg("stream") = py::none();
  const auto workspace = arg("workspace") = py::none();
  const auto when_zero = arg("when_zero") = py::none();
  const auto when_nonzero = arg("when_nonzero") = py::none();
  m.def("write_kv", &WriteKvPy, arg("kv_cache"), arg("slot_mapping"), arg("key"), arg("value"),
        py::kw_only(), stream,
        "vLLM reshape_and_cache: key/value row i into slot slot_mapping[i] (negative: skipped).");
  m.def("append_kv_and_digests", &AppendKvAndDigestsPy, arg("kv_cache"), arg("slot_mapping"),
        arg("key"), arg("value"), arg("digests"), py::kw_only(), workspace, stream,
        "write_kv fused with the incremental digest update, in slot order (GPU: workspace= of "
        "append_workspace_bytes keeps its addresses fixed for CUDA-graph capture; None takes "
        "it from the stream-ordered pool).");
  m.def("update_digests", &UpdateDigestsPy, arg("kv_cache"), arg("slot_mapping"), arg("digests"),
        py::kw_only(), stream, "Incremental digest update for slots already written.");
  m.def("build_digests", &BuildDigestsPy, arg("kv_cache"), arg("block_table"), arg("seq_lens"),
        arg("digests"), py::kw_only(), stream,
        "Step 1, bulk: digests of every page the sequences use.");
  m.def("compute_relevancy", &ComputeRelevancyPy, arg("query"), arg("kv_cache"), arg("digests"),
        arg("block_table"), arg("seq_lens"), arg("scores"), py::kw_only(),
        arg("aggregation") = "max", arg("num_threads") = 1, stream,
        "Step 2: Quest page bounds per (sequence, KV head); on the CPU over num_threads host "
        "threads (the scores do not depend on the count).");
  m.def("select_pages", &SelectPagesPy, arg("scores"), arg("block_table"), arg("seq_lens"),
        arg("block_size"), arg("pages"), arg("counts"), py::kw_only(), arg("budget"),
        arg("sinks") = 1, arg("locals") = 1, arg("num_threads") = 1, stream,
        "Step 3: top-k pages plus sinks and locals; on the CPU the (sequence, KV head) rows are "
        "split over num_threads host threads (same selection for any count).");
  m.def("score_and_select", &ScoreAndSelectPy, arg("query"), arg("kv_cache"), arg("digests"),
        arg("block_table"), arg("seq_lens"), arg("pages"), arg("counts"), py::kw_only(),
        arg("budget"), arg("sinks") = 1, arg("locals") = 1, arg("aggregation") = "max",
        arg("num_threads") = 1, workspace, stream, when_zero, when_nonzero,
        "Steps 2 and 3 (CPU: on num_threads host threads, same selection for any count; GPU: "
        "workspace of select_workspace_bytes). when_zero= / when_nonzero=: an "
        "int32 [1] tensor; the call does nothing unless it is zero / non-zero (on the device: "
        "read by the kernels, no host sync).");
  m.def("score_select_decode", &ScoreSelectDecodePy, arg("query"), arg("kv_cache"), arg("digests"),
        arg("block_table"), arg("seq_lens"), arg("pages"), arg("counts"), arg("out"), arg("scale"),
        py::kw_only(), arg("budget"), arg("sinks") = 1, arg("locals") = 1,
        arg("aggregation") = "max", arg("num_threads") = 1, stream,
        "Steps 2-4 of a sparse layer on host tensors: score_and_select into pages / counts, then "
        "sparse_decode into out, as one parallel call on num_threads host threads where the "
        "budget fits one decode chunk (decode_chunk_tokens()), each row attended where it is "
        "selected; the same bits as the two calls. CUDA tensors: call those two instead.");
  m.def("dense_decode", &DenseDecodePy, arg("query"), arg("kv_cache"), arg("block_table"),
        arg("seq_lens"), arg("out"), arg("scale"), py::kw_only(), arg("num_threads") = 1, workspace,
        stream, when_zero, when_nonzero,
        "Step 4, dense: one query per sequence (when_zero= / when_nonzero= as score_and_select; "
        "GPU: workspace of decode_workspace_bytes with "
        "max_items = block_table.shape[1]).");
  m.def("sparse_decode", &SparseDecodePy, arg("query"), arg("kv_cache"), arg("block_table"),
        arg("seq_lens"), arg("pages"), arg("counts"), arg("out"), arg("scale"), py::kw_only(),
        arg("num_threads") = 1, workspace, stream, when_zero, when_nonzero,
        "Step 4 over the selected pages only (when_zero= / when_nonzero= as score_and_select; "
        "GPU: workspace of decode_workspace_bytes with "
        "max_items = pages.shape[2]).");
  m.def("prefill_attention", &PrefillAttentionPy, arg("query"), arg("query_start_loc"),
        arg("kv_cache"), arg("block_table"), arg("seq_lens"), arg("out"), arg("scale"),
        py::kw_only(), arg("num_threads") = 1, stream,
        "Causal attention of the last query tokens of each sequence over the cache (CPU).");
  m.def(
      "active_cpu_kernel", [] { return std::string(mempipe::ActiveCpuKernelName()); },
      "The host kernels the next call takes: \"avx512-bf16\", \"avx512\", \"avx2\" or "
      "\"portable\" (core/cpu_kernel.h; the first the CPU has).");
  m.def("cpu_description", &mempipe::CpuDescription,
        "The CPU, for the record of a measurement: brand string, x86 family and model, logical "
        "CPUs (core/cpu_kernel.h).");
  m.def("decode_workspace_bytes", &DecodeWorkspaceBytesPy, arg("num_seqs"), arg("num_heads"),
        arg("num_kv_heads"), arg("max_items"), py::kw_only(), arg("device") = 0,
        "GPU scratch bytes of dense_decode / sparse_decode on CUDA device `device`.");
  m.def("select_workspace_bytes", &SelectWorkspaceBytesPy, arg("num_seqs"), arg("num_kv_heads"),
        arg("max_blocks_per_seq"), "GPU scratch bytes of score_and_select.");
  py::class_<SelectionOffloadPy>(m, "SelectionOffload",
                                 "Steps 1-3 on the (emulated or XRT) U55C, fed from the decode "
                                 "stream without a host-side blocking call (backend/"
                                 "selection_offload.h). Reasons in status[0]: 0 selected, "
                                 "1 timeout, 2 error, 3 dead, 4 invalid, 5 busy.")
      .def(py::init<const std::string&, const std::string&, bool, const std::string&, double, int,
                    int, const py::object&, int, double, int, double>(),
           py::kw_only(), arg("device") = "cpu", arg("fpga_backend") = "emulated",
           arg("paced") = true, arg("functional") = "reference", arg("deadline_ms") = 100.0,
           arg("slots") = 64, arg("threads") = 0, arg("params") = py::none(),
           arg("dead_after_failures") = 3, arg("gate_timeout_ms") = 0.0, arg("append_ring") = 8,
           arg("append_timeout_ms") = 10000.0)
      .def("add_layer", &SelectionOffloadPy::AddLayer, arg("layer"), arg("kv_cache"), py::kw_only(),
           arg("digest_dtype") = "native",
           "Registers a layer; geometry from a [2, blocks, bs, kvh, hd] cache (data unread). "
           "digest_dtype: how the card stores and scans its digests, 'native' or 'int8' "
           "(retriever/digest.h; the card keeps its own, never the caller's).")
      .def("build_digests", &SelectionOffloadPy::BuildDigests, arg("layer"), arg("kv_cache"),
           arg("block_table"), arg("seq_lens"),
           "Bulk digests after prefill (blocking; CUDA tensors: the K plane is copied to the host "
           "once).")
      .def("append", &SelectionOffloadPy::Append, arg("layer"), arg("slot_mapping"), arg("key"),
           py::kw_only(), stream, "The step's new keys [T, kvh, hd] at slot_mapping [T] int64.")
      .def("submit", &SelectionOffloadPy::Submit, arg("slot"), arg("layer"), arg("query"),
           arg("block_table"), arg("seq_lens"), py::kw_only(), arg("budget"), arg("sinks") = 1,
           arg("locals") = 1, arg("aggregation") = "max", stream,
           "Scores query [S, H, D] against `layer`'s digests (look-ahead passes the next layer).")
      .def("wait", &SelectionOffloadPy::Wait, arg("slot"), arg("pages"), arg("counts"),
           arg("status"), py::kw_only(), stream,
           "Stream-ordered wait: pages/counts get the selection when status[0] == 0 (else "
           "untouched, status[0] = the fallback reason).")
      .def("metrics", &SelectionOffloadPy::Metrics)
      .def("reset_metrics", &SelectionOffloadPy::ResetMetrics)
      .def("shutdown", &SelectionOffloadPy::Shutdown)
      .def_property_readonly("device", &SelectionOffloadPy::Device)
      .def_property_readonly("functional", &SelectionOffloadPy::Functional)
      .def_property_readonly("slots", &SelectionOffloadPy::Slots)
      .def_property_readonly("deadline_ms", &SelectionOffloadPy::DeadlineMs);
  py::list reasons;
  for (int r = 0; r < mempipe::kNumOffloadReasons; ++r) {
    reasons.append(std::string(mempipe::OffloadReasonName(static_cast<mempipe::OffloadReason>(r))));
  }
  m.attr("offload_reasons") = py::tuple(reasons);
  m.def("append_workspace_bytes", &AppendWorkspaceBytesPy, arg("num_blocks"),
        "GPU scratch bytes of append_kv_and_digests on a cache of num_blocks blocks.");
  // The host kernels' parallel-for (core/host_parallel_runtime.h).
  m.def(
      "set_host_parallel_runtime",
      [](const std::string& library) { Check(mempipe::InstallLoadedOpenMpRuntime(library)); },
      arg("library"),
      "Runs the host kernels' (sequence, KV head) split on the thread team of the OpenMP runtime "
      "`library` (a path or soname, e.g. torch's torch/lib/libgomp.so.1) already loaded in this "
      "process, instead of mempipe's own pool; process-wide. RuntimeError when it is not loaded "
      "or lacks GOMP_parallel / omp_get_thread_num / omp_get_num_threads; ValueError when empty.");
  m.def(
      "back_with_huge_pages",
      [](uintptr_t data_ptr, size_t nbytes, const std::string& mode) {
        const absl::StatusOr<mempipe::HugePageMode> m = mempipe::ParseHugePageMode(mode);
        Check(m.status());
        absl::StatusOr<mempipe::HugePageReport> r;
        {
          py::gil_scoped_release release;
          r = mempipe::BackWithHugePages(reinterpret_cast<void*>(data_ptr), nbytes, *m);
        }
        Check(r.status());
        py::dict d;
        d["advised_bytes"] = r->advised_bytes;
        d["huge_before"] = r->huge_before;
        d["huge_after"] = r->huge_after;
        d["ms"] = r->ms;
        d["incomplete"] = r->incomplete;
        return d;
      },
      arg("data_ptr"), arg("nbytes"), py::kw_only(), arg("mode") = "collapse",
      "Backs host memory [data_ptr, data_ptr + nbytes) of this process (a CPU tensor's storage: "
      "t.untyped_storage().data_ptr(), .nbytes()) with transparent huge pages, contents kept "
      "(core/huge_pages.h): mode 'advise' (MADV_HUGEPAGE), 'collapse' (then MADV_COLLAPSE, Linux "
      "6.1+: pages already faulted in move now) or 'off'. Returns {advised_bytes (the range's "
      "whole 2 MiB pages), huge_before, huge_after (bytes in huge pages), ms, incomplete ('' or "
      "why part of the range stays in small pages: EAGAIN after retries, ENOMEM)}. ValueError "
      "for a bad mode or where madvise refuses (EINVAL, EPERM), naming errno.");
  m.def(
      "collapse_huge_pages",
      [](uintptr_t data_ptr, size_t nbytes) {
        absl::StatusOr<mempipe::HugePageReport> r;
        {
          py::gil_scoped_release release;
          r = mempipe::CollapseHugePages(reinterpret_cast<void*>(data_ptr), nbytes);
        }
        Check(r.status());
        py::dict d;
        d["advised_bytes"] = r->advised_bytes;
        d["ms"] = r->ms;
        d["incomplete"] = r->incomplete;
        return d;
      },
      arg("data_ptr"), arg("nbytes"),
      "MADV_COLLAPSE alone over the whole 2 MiB pages of host memory [data_ptr, data_ptr + "
      "nbytes) of this process, contents kept (core/huge_pages.h's CollapseHugePages): no "
      "MADV_HUGEPAGE, no /proc/self/smaps reads, cheap enough to call for each part of a KV cache "
      "as it comes into use. Returns {advised_bytes, ms, incomplete}; ValueError where madvise "
      "refuses (EINVAL before Linux 6.1, EPERM), naming errno.");
  m.def(
      "huge_page_bytes",
      [](uintptr_t data_ptr, size_t nbytes) {
        const absl::StatusOr<size_t> r =
            mempipe::HugePageBytes(reinterpret_cast<const void*>(data_ptr), nbytes);
        Check(r.status());
        return *r;
      },
      arg("data_ptr"), arg("nbytes"),
      "Bytes of host memory [data_ptr, data_ptr + nbytes) that huge pages back now "
      "(/proc/self/smaps' AnonHugePages; core/huge_pages.h).");
  m.def("reset_host_parallel_runtime", &mempipe::ResetHostParallelRuntime,
        "Back to mempipe's own thread pool for the host kernels.");
  m.def(
      "host_parallel_runtime",
      [] {
        const mempipe::HostParallelRuntimeInfo info = mempipe::GetHostParallelRuntimeInfo();
        py::dict d;
        d["installed"] = info.installed;
        d["library"] = info.name;
        d["team_calls"] = info.team_calls;
        d["last_call_threads"] = info.last_call_threads;
        d["max_call_threads"] = info.max_call_threads;
        d["last_call_team"] = info.last_call_team;
        return d;
      },
      "What the host kernels' parallel-for runs on: {installed, library, team_calls (calls run "
      "on the runtime's team, ever), last_call_threads / max_call_threads (distinct team threads "
      "that ran work in the latest call / in any call), last_call_team (the team size the runtime "
      "gave the latest call)}.");
}
