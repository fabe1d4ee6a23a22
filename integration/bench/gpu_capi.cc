// C ABI over the GPU launchers, for callers without C++ (the benchmark drives it through
// Python ctypes with torch tensors' data_ptr()). Every pointer is device memory; dtype is
// DType's value (0 fp32, 1 fp16, 2 bf16); stream is a cudaStream_t/hipStream_t or 0.
// Functions return 0 on success, else the absl status code, and keep the message for
// mempipe_gpu_last_error() (per thread).
//
//   if (mempipe_paged_decode(...) != 0) fprintf(stderr, "%s\n", mempipe_gpu_last_error());
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "attention/gpu/paged_decode_gpu.h"
#include "retriever/gpu/digest_gpu.h"
#include "retriever/gpu/select_gpu.h"

namespace {

thread_local std::string last_error;

int Report(const absl::Status& s) {
  last_error = s.ok() ? "" : std::string(s.message());
  return static_cast<int>(s.code());
}

mempipe::KvCacheView Cache(void* kv, int dtype, int num_blocks, int block_size, int num_kv_heads,
                           int head_dim) {
  return mempipe::KvCacheView{
      kv, static_cast<mempipe::DType>(dtype), num_blocks, block_size, num_kv_heads, head_dim};
}

}  // namespace

extern "C" {

const char* mempipe_gpu_last_error() { return last_error.c_str(); }

size_t mempipe_decode_workspace_bytes(int num_seqs, int num_heads, int num_kv_heads,
                                      int max_items) {
  return mempipe::PagedDecodeWorkspaceBytes(num_seqs, num_heads, num_kv_heads, max_items);
}

size_t mempipe_select_workspace_bytes(int num_seqs, int num_kv_heads, int max_blocks_per_seq) {
  return mempipe::SelectWorkspaceBytes(
      mempipe::BlockTableView{nullptr, nullptr, num_seqs, max_blocks_per_seq}, num_kv_heads);
}

// query/out [num_seqs, num_heads, head_dim]; kv [2, num_blocks, block_size, num_kv_heads,
// head_dim]; block_table [num_seqs, max_blocks_per_seq]; seq_lens [num_seqs]; pages
// [num_seqs, num_kv_heads, max_selected] and counts [num_seqs, num_kv_heads] (null: dense).
int mempipe_paged_decode(const void* query, void* out, void* kv, const int32_t* block_table,
                         const int32_t* seq_lens, const int32_t* pages, const int32_t* counts,
                         int dtype, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                         int num_blocks, int block_size, int max_blocks_per_seq, int max_selected,
                         float scale, void* workspace, size_t workspace_bytes, void* stream) {
  const mempipe::DecodeIo io{query,    out,       static_cast<mempipe::DType>(dtype),
                             num_seqs, num_heads, head_dim};
  const auto cache = Cache(kv, dtype, num_blocks, block_size, num_kv_heads, head_dim);
  const mempipe::BlockTableView table{block_table, seq_lens, num_seqs, max_blocks_per_seq};
  if (pages == nullptr) {
    return Report(
        mempipe::DenseDecodeGpu(io, cache, table, scale, workspace, workspace_bytes, stream));
  }
  const mempipe::PageList list{pages, counts, num_kv_heads, max_selected};
  return Report(
      mempipe::SparseDecodeGpu(io, cache, table, list, scale, workspace, workspace_bytes, stream));
}

// digests [num_blocks, 2, num_kv_heads, head_dim]; selected [num_seqs, num_kv_heads,
// max_selected]; counts [num_seqs, num_kv_heads]; aggregation 0 max, 1 sum.
int mempipe_score_and_select(const void* query, void* digests, const int32_t* block_table,
                             const int32_t* seq_lens, int dtype, int num_seqs, int num_heads,
                             int num_kv_heads, int head_dim, int num_blocks, int block_size,
                             int max_blocks_per_seq, int budget_tokens, int sink_pages,
                             int local_pages, int aggregation, int32_t* selected, int32_t* counts,
                             int max_selected, void* workspace, size_t workspace_bytes,
                             void* stream) {
  const auto dt = static_cast<mempipe::DType>(dtype);
  const mempipe::QueryView q{query, dt, num_seqs, num_heads, head_dim};
  const auto cache = Cache(digests, dtype, num_blocks, block_size, num_kv_heads, head_dim);
  const mempipe::DigestView dg{digests, dt, num_blocks, num_kv_heads, head_dim};
  const mempipe::BlockTableView table{block_table, seq_lens, num_seqs, max_blocks_per_seq};
  const mempipe::SelectionConfig config{budget_tokens, sink_pages, local_pages,
                                        static_cast<mempipe::GroupAggregation>(aggregation)};
  const mempipe::SelectionView view{selected, counts, num_seqs, num_kv_heads, max_selected};
  return Report(mempipe::ScoreAndSelectGpu(q, cache, dg, table, config, view, workspace,
                                           workspace_bytes, stream));
}

// Step 2 alone: scores [num_seqs, num_kv_heads, max_blocks_per_seq] fp32.
int mempipe_compute_relevancy(const void* query, void* digests, const int32_t* block_table,
                              const int32_t* seq_lens, int dtype, int num_seqs, int num_heads,
                              int num_kv_heads, int head_dim, int num_blocks, int block_size,
                              int max_blocks_per_seq, int aggregation, float* scores,
                              void* stream) {
  const auto dt = static_cast<mempipe::DType>(dtype);
  const mempipe::QueryView q{query, dt, num_seqs, num_heads, head_dim};
  const auto cache = Cache(digests, dtype, num_blocks, block_size, num_kv_heads, head_dim);
  const mempipe::DigestView dg{digests, dt, num_blocks, num_kv_heads, head_dim};
  const mempipe::BlockTableView table{block_table, seq_lens, num_seqs, max_blocks_per_seq};
  return Report(mempipe::ComputeRelevancyGpu(
      q, cache, dg, table, static_cast<mempipe::GroupAggregation>(aggregation), scores, stream));
}

int mempipe_build_digests(void* kv, void* digests, const int32_t* block_table,
                          const int32_t* seq_lens, int dtype, int num_seqs, int num_kv_heads,
                          int head_dim, int num_blocks, int block_size, int max_blocks_per_seq,
                          void* stream) {
  const auto cache = Cache(kv, dtype, num_blocks, block_size, num_kv_heads, head_dim);
  const mempipe::DigestView dg{digests, static_cast<mempipe::DType>(dtype), num_blocks,
                               num_kv_heads, head_dim};
  const mempipe::BlockTableView table{block_table, seq_lens, num_seqs, max_blocks_per_seq};
  return Report(mempipe::BuildDigestsGpu(cache, table, dg, stream));
}

// slot_mapping [num_tokens] int64; key/value [num_tokens, num_kv_heads, head_dim].
int mempipe_append_kv_and_digests(void* kv, void* digests, const int64_t* slot_mapping,
                                  int num_tokens, const void* key, const void* value, int dtype,
                                  int num_kv_heads, int head_dim, int num_blocks, int block_size,
                                  void* stream) {
  const auto cache = Cache(kv, dtype, num_blocks, block_size, num_kv_heads, head_dim);
  const mempipe::DigestView dg{digests, static_cast<mempipe::DType>(dtype), num_blocks,
                               num_kv_heads, head_dim};
  return Report(
      mempipe::AppendKvAndDigestsGpu(cache, slot_mapping, num_tokens, key, value, dg, stream));
}

}  // extern "C"
