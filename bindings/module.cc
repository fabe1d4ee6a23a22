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
//                       budget=4096, sinks=1, locals=1, aggregation="max")
//   mp.sparse_decode(query, kv_cache, block_table, seq_lens, pages, counts, out, scale,
//                    num_threads=4)   // attention: host threads sharing (sequence, KV head)
//
// Shapes (the cores' layouts; T tokens, S sequences, H query heads, KVH KV heads, D head_dim):
//   kv_cache      [2, num_blocks, block_size, KVH, D]  fp32 | fp16 | bf16
//   digests       [num_blocks, 2, KVH, D]               cache dtype
//   key, value    [T, KVH, D]                            cache dtype
//   slot_mapping  [T] int64
//   block_table   [S, max_blocks_per_seq] int32;  seq_lens [S] int32
//   query, out    [S, H, D] (decode) or [T, H, D] (prefill); query_start_loc [S + 1] int32
//   scores        [S, KVH, max_blocks_per_seq] fp32
//   pages         [S, KVH, max_selected] int32;   counts [S, KVH] int32
//
// Devices and streams: this build runs every step on the CPU and rejects device memory with
// NotImplementedError naming the tensor and its device. The device check sits in one place
// (RequireHostMemory); GPU kernels plug in there, taking the caller's stream as an integer
// handle (torch.cuda.current_stream().cuda_stream) so that work stays ordered with the
// framework's own kernels without a synchronization.
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"
#include "attention/decode.h"
#include "backend/policy.h"
#include "bindings/dlpack_tensor.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe::bindings {
namespace {

using py::arg;

BorrowedTensor Borrow(const py::handle& obj, const char* name) {
  return ValueOrThrow(BorrowTensor(obj, name));
}

void Check(const absl::Status& status) { ThrowIfError(status); }

template <size_t N>
py::tuple IntTuple(const int (&values)[N]) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = values[i];
  return t;
}

const char* DeviceName(DLDeviceType t) {
  switch (t) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
      return "cuda";
    case kDLCUDAHost:
      return "cuda_host";
    case kDLROCM:
      return "rocm";
    case kDLCUDAManaged:
      return "cuda_managed";
    default:
      return "other";
  }
}

// Host memory only in this build (see the banner).
void RequireHostMemory(std::initializer_list<const BorrowedTensor*> tensors) {
  for (const BorrowedTensor* t : tensors) {
    const DLDeviceType d = t->device.device_type;
    if (d != kDLCPU && d != kDLCUDAHost) {
      Check(absl::UnimplementedError(
          absl::StrCat(t->name, " is on device ", DeviceName(d), ":", t->device.device_id,
                       "; this build of mempipe runs its steps on the CPU only (host memory)")));
    }
  }
}

// Converts a [2, num_blocks, block_size, KVH, D] tensor.
KvCacheView CacheView(const BorrowedTensor& kv) {
  Check(kv.RequireRank(5));
  Check(kv.RequireDim(0, 2, "K and V"));
  KvCacheView v;
  v.data = kv.data;
  v.dtype = ValueOrThrow(kv.FloatDType());
  v.num_blocks = static_cast<int>(kv.shape[1]);
  v.block_size = static_cast<int>(kv.shape[2]);
  v.num_kv_heads = static_cast<int>(kv.shape[3]);
  v.head_dim = static_cast<int>(kv.shape[4]);
  return v;
}

void RequireSameDType(const BorrowedTensor& t, const KvCacheView& cache) {
  const DType d = ValueOrThrow(t.FloatDType());
  if (d != cache.dtype) {
    Check(absl::InvalidArgumentError(absl::StrCat(t.name, " must have the cache dtype ",
                                                  DTypeName(cache.dtype), ", got ", DTypeName(d))));
  }
}

// Converts a [num_blocks, 2, KVH, D] tensor matching `cache`.
DigestView DigestsView(const BorrowedTensor& dg, const KvCacheView& cache) {
  Check(dg.RequireRank(4));
  Check(dg.RequireDim(0, cache.num_blocks, "num_blocks"));
  Check(dg.RequireDim(1, 2, "max and min"));
  Check(dg.RequireDim(2, cache.num_kv_heads, "num_kv_heads"));
  Check(dg.RequireDim(3, cache.head_dim, "head_dim"));
  RequireSameDType(dg, cache);
  return DigestView{dg.data, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
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

void CheckSlots(const BorrowedTensor& slots) {
  Check(slots.RequireRank(1));
  Check(slots.RequireType(ElemType::kInt64));
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
  io.num_threads = num_threads;
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

void WriteKvPy(py::handle kv_cache, py::handle slot_mapping, py::handle key, py::handle value) {
  auto kv = Borrow(kv_cache, "kv_cache"), slots = Borrow(slot_mapping, "slot_mapping"),
       k = Borrow(key, "key"), v = Borrow(value, "value");
  RequireHostMemory({&kv, &slots, &k, &v});
  const KvCacheView cache = CacheView(kv);
  CheckSlots(slots);
  CheckTokenRows(k, slots, cache);
  CheckTokenRows(v, slots, cache);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
  RunReleased([&] { return WriteKv(cache, s, n, k.data, v.data); });
}

void AppendKvAndDigestsPy(py::handle kv_cache, py::handle slot_mapping, py::handle key,
                          py::handle value, py::handle digests) {
  auto kv = Borrow(kv_cache, "kv_cache"), slots = Borrow(slot_mapping, "slot_mapping"),
       k = Borrow(key, "key"), v = Borrow(value, "value"), dg = Borrow(digests, "digests");
  RequireHostMemory({&kv, &slots, &k, &v, &dg});
  const KvCacheView cache = CacheView(kv);
  const DigestView dv = DigestsView(dg, cache);
  CheckSlots(slots);
  CheckTokenRows(k, slots, cache);
  CheckTokenRows(v, slots, cache);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
  RunReleased([&] { return AppendKvAndDigests(cache, s, n, k.data, v.data, dv); });
}

void UpdateDigestsPy(py::handle kv_cache, py::handle slot_mapping, py::handle digests) {
  auto kv = Borrow(kv_cache, "kv_cache"), slots = Borrow(slot_mapping, "slot_mapping"),
       dg = Borrow(digests, "digests");
  RequireHostMemory({&kv, &slots, &dg});
  const KvCacheView cache = CacheView(kv);
  const DigestView dv = DigestsView(dg, cache);
  CheckSlots(slots);
  const auto* s = static_cast<const int64_t*>(slots.data);
  const int n = static_cast<int>(slots.shape[0]);
  RunReleased([&] { return UpdateDigests(cache, s, n, dv); });
}

void BuildDigestsPy(py::handle kv_cache, py::handle block_table, py::handle seq_lens,
                    py::handle digests) {
  auto kv = Borrow(kv_cache, "kv_cache"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), dg = Borrow(digests, "digests");
  RequireHostMemory({&kv, &bt, &lens, &dg});
  const KvCacheView cache = CacheView(kv);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
  RunReleased([&] { return BuildDigests(cache, table, dv); });
}

void ComputeRelevancyPy(py::handle query, py::handle kv_cache, py::handle digests,
                        py::handle block_table, py::handle seq_lens, py::handle scores,
                        const std::string& aggregation) {
  auto q = Borrow(query, "query"), kv = Borrow(kv_cache, "kv_cache"),
       dg = Borrow(digests, "digests"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), sc = Borrow(scores, "scores");
  RequireHostMemory({&q, &kv, &dg, &bt, &lens, &sc});
  const KvCacheView cache = CacheView(kv);
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
  RunReleased([&] { return ComputeRelevancy(qv, cache, dv, table, agg, out); });
}

void SelectPagesPy(py::handle scores, py::handle block_table, py::handle seq_lens, int block_size,
                   py::handle pages, py::handle counts, int budget, int sinks, int locals) {
  auto sc = Borrow(scores, "scores"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), pg = Borrow(pages, "pages"),
       ct = Borrow(counts, "counts");
  RequireHostMemory({&sc, &bt, &lens, &pg, &ct});
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
  RunReleased([&] { return SelectPages(s, table, block_size, kv_heads, config, sel); });
}

void ScoreAndSelectPy(py::handle query, py::handle kv_cache, py::handle digests,
                      py::handle block_table, py::handle seq_lens, py::handle pages,
                      py::handle counts, int budget, int sinks, int locals,
                      const std::string& aggregation) {
  auto q = Borrow(query, "query"), kv = Borrow(kv_cache, "kv_cache"),
       dg = Borrow(digests, "digests"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), pg = Borrow(pages, "pages"),
       ct = Borrow(counts, "counts");
  RequireHostMemory({&q, &kv, &dg, &bt, &lens, &pg, &ct});
  const KvCacheView cache = CacheView(kv);
  const DigestView dv = DigestsView(dg, cache);
  const BlockTableView table = TableView(bt, lens);
  const QueryView qv = QueryOf(q);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, cache.num_kv_heads);
  const SelectionConfig config = ConfigOf(budget, sinks, locals, aggregation);
  RunReleased([&] { return ScoreAndSelect(qv, cache, dv, table, config, sel); });
}

void DenseDecodePy(py::handle query, py::handle kv_cache, py::handle block_table,
                   py::handle seq_lens, py::handle out, float scale, int num_threads) {
  auto q = Borrow(query, "query"), kv = Borrow(kv_cache, "kv_cache"),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       o = Borrow(out, "out");
  RequireHostMemory({&q, &kv, &bt, &lens, &o});
  const KvCacheView cache = CacheView(kv);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  RunReleased([&] { return DenseDecode(io, cache, table, scale); });
}

void SparseDecodePy(py::handle query, py::handle kv_cache, py::handle block_table,
                    py::handle seq_lens, py::handle pages, py::handle counts, py::handle out,
                    float scale, int num_threads) {
  auto q = Borrow(query, "query"), kv = Borrow(kv_cache, "kv_cache"),
       bt = Borrow(block_table, "block_table"), lens = Borrow(seq_lens, "seq_lens"),
       pg = Borrow(pages, "pages"), ct = Borrow(counts, "counts"), o = Borrow(out, "out");
  RequireHostMemory({&q, &kv, &bt, &lens, &pg, &ct, &o});
  const KvCacheView cache = CacheView(kv);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  const SelectionView sel = SelectionOf(pg, ct, table.num_seqs, cache.num_kv_heads);
  const PageList list{sel.pages, sel.counts, sel.num_kv_heads, sel.max_selected};
  RunReleased([&] { return SparseDecode(io, cache, table, list, scale); });
}

void PrefillAttentionPy(py::handle query, py::handle query_start_loc, py::handle kv_cache,
                        py::handle block_table, py::handle seq_lens, py::handle out, float scale,
                        int num_threads) {
  auto q = Borrow(query, "query"), qsl = Borrow(query_start_loc, "query_start_loc"),
       kv = Borrow(kv_cache, "kv_cache"), bt = Borrow(block_table, "block_table"),
       lens = Borrow(seq_lens, "seq_lens"), o = Borrow(out, "out");
  RequireHostMemory({&q, &qsl, &kv, &bt, &lens, &o});
  const KvCacheView cache = CacheView(kv);
  const BlockTableView table = TableView(bt, lens);
  const DecodeIo io = IoView(q, o, num_threads);
  Check(qsl.RequireRank(1));
  Check(qsl.RequireType(ElemType::kInt32));
  Check(qsl.RequireDim(0, table.num_seqs + 1, "num_seqs + 1"));
  const auto* starts = static_cast<const int32_t*>(qsl.data);
  RunReleased([&] { return PrefillAttention(io, starts, cache, table, scale); });
}

}  // namespace
}  // namespace mempipe::bindings

PYBIND11_MODULE(_mempipe, m) {
  using namespace mempipe::bindings;  // NOLINT: the module body names every binding
  using py::arg;
  m.doc() = "mempipe: paged sparse-attention steps on caller-owned tensors (CPU build)";
  // The supported sizes and the sparsity rules come from the C++ definitions (core/paged_kv.h,
  // core/dtype.h, backend/policy.h); Python keeps no copy.
  m.attr("supported_block_sizes") = IntTuple(mempipe::kSupportedBlockSizes);
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
  m.attr("gpu") = false;

  m.def("write_kv", &WriteKvPy, arg("kv_cache"), arg("slot_mapping"), arg("key"), arg("value"),
        "vLLM reshape_and_cache: key/value row i into slot slot_mapping[i] (negative: skipped).");
  m.def("append_kv_and_digests", &AppendKvAndDigestsPy, arg("kv_cache"), arg("slot_mapping"),
        arg("key"), arg("value"), arg("digests"),
        "write_kv fused with the incremental digest update, in slot order.");
  m.def("update_digests", &UpdateDigestsPy, arg("kv_cache"), arg("slot_mapping"), arg("digests"),
        "Incremental digest update for slots already written.");
  m.def("build_digests", &BuildDigestsPy, arg("kv_cache"), arg("block_table"), arg("seq_lens"),
        arg("digests"), "Step 1, bulk: digests of every page the sequences use.");
  m.def("compute_relevancy", &ComputeRelevancyPy, arg("query"), arg("kv_cache"), arg("digests"),
        arg("block_table"), arg("seq_lens"), arg("scores"), py::kw_only(),
        arg("aggregation") = "max", "Step 2: Quest page bounds per (sequence, KV head).");
  m.def("select_pages", &SelectPagesPy, arg("scores"), arg("block_table"), arg("seq_lens"),
        arg("block_size"), arg("pages"), arg("counts"), py::kw_only(), arg("budget"),
        arg("sinks") = 1, arg("locals") = 1, "Step 3: top-k pages plus sinks and locals.");
  m.def("score_and_select", &ScoreAndSelectPy, arg("query"), arg("kv_cache"), arg("digests"),
        arg("block_table"), arg("seq_lens"), arg("pages"), arg("counts"), py::kw_only(),
        arg("budget"), arg("sinks") = 1, arg("locals") = 1, arg("aggregation") = "max",
        "Steps 2 and 3.");
  m.def("dense_decode", &DenseDecodePy, arg("query"), arg("kv_cache"), arg("block_table"),
        arg("seq_lens"), arg("out"), arg("scale"), py::kw_only(), arg("num_threads") = 1,
        "Step 4, dense: one query per sequence.");
  m.def("sparse_decode", &SparseDecodePy, arg("query"), arg("kv_cache"), arg("block_table"),
        arg("seq_lens"), arg("pages"), arg("counts"), arg("out"), arg("scale"), py::kw_only(),
        arg("num_threads") = 1, "Step 4 over the selected pages only.");
  m.def("prefill_attention", &PrefillAttentionPy, arg("query"), arg("query_start_loc"),
        arg("kv_cache"), arg("block_table"), arg("seq_lens"), arg("out"), arg("scale"),
        py::kw_only(), arg("num_threads") = 1,
        "Causal attention of the last query tokens of each sequence over the cache.");
}
