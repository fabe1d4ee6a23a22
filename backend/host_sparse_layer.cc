#include "backend/host_sparse_layer.h"

#include <mutex>

#include "core/status_macros.h"

namespace mempipe {

bool HostSparseLayerFused(const SelectionConfig& config, int block_size) {
  return config.hierarchy.Flat() && block_size > 0 &&
         config.PagesPerHead(block_size) <= DecodeChunkPages(block_size);
}

absl::Status HostSparseLayer(const DecodeIo& io, const KvCacheView& cache,
                             const DigestView& digests, const BlockTableView& table,
                             const SelectionConfig& config, const SelectionView& out, float scale) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, table));
  const QueryView query{io.query, io.dtype, io.num_seqs, io.num_heads, io.head_dim};
  const PageList list{out.pages, out.counts, out.num_kv_heads, out.max_selected};
  if (!HostSparseLayerFused(config, cache.block_size)) {
    MEMPIPE_RETURN_IF_ERROR(
        ScoreAndSelect(query, cache, digests, table, config, out, io.num_threads));
    return SparseDecode(io, cache, table, list, scale);
  }
  // Each range of rows is attended on the thread that selected it. A range's error (none is
  // expected of a selection SelectPages made) is kept, the first one, and returned after the call.
  std::mutex mu;
  absl::Status first_error;
  MEMPIPE_RETURN_IF_ERROR(ScoreAndSelectThen(
      query, cache, digests, table, config, out, io.num_threads, [&](int64_t first, int64_t last) {
        absl::Status st = SparseDecodeRows(io, cache, table, list, scale, first, last);
        if (!st.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          if (first_error.ok()) first_error = std::move(st);
        }
      }));
  return first_error;
}

}  // namespace mempipe
