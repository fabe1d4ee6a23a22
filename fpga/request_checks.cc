#include "fpga/request_checks.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "fpga/hls/kernel_common.h"
#include "retriever/select.h"

namespace mempipe {

absl::Status ValidateScoreRequest(const SelectRequest& r, const CacheShape& shape) {
  const KvCacheView geometry = shape.Geometry();
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(r.config, shape.block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(r.config, "the FPGA score kernel (fpga/hls)"));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(r.table, shape.block_size, shape.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(r.query, geometry, r.table));
  const int k = r.config.PagesPerHead(shape.block_size);
  if (r.out.pages == nullptr || r.out.counts == nullptr) {
    return absl::InvalidArgumentError("selection pointers must not be null");
  }
  if (r.out.num_seqs != r.table.num_seqs || r.out.num_kv_heads != shape.num_kv_heads ||
      r.out.max_selected < k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection is [", r.out.num_seqs, ", ", r.out.num_kv_heads, ", ", r.out.max_selected,
        "]; need [", r.table.num_seqs, ", ", shape.num_kv_heads, ", >= ", k, "]"));
  }
  const int group = r.query.num_heads / shape.num_kv_heads;
  if (group > fpga_hls::kMaxGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("GQA ratio ", group, " exceeds the FPGA kernel's limit of ",
                     fpga_hls::kMaxGroup, " query heads per KV head"));
  }
  if (r.table.max_blocks_per_seq > fpga_hls::kMaxPagesPerSeq) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_blocks_per_seq ", r.table.max_blocks_per_seq, " exceeds the FPGA kernel's limit of ",
        fpga_hls::kMaxPagesPerSeq, " pages per sequence"));
  }
  const int middle = k - r.config.num_sink_pages - r.config.num_local_pages;
  if (middle > fpga_hls::kMaxTopK) {
    return absl::InvalidArgumentError(absl::StrCat("budget keeps ", middle,
                                                   " middle pages; the FPGA kernel keeps at most ",
                                                   fpga_hls::kMaxTopK));
  }
  return absl::OkStatus();
}

absl::Status ValidateAppend(const CacheShape& shape, const int64_t* slots, int num_tokens,
                            const void* keys) {
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens > 0 && (slots == nullptr || keys == nullptr)) {
    return absl::InvalidArgumentError("slots and keys must not be null");
  }
  const int64_t capacity = static_cast<int64_t>(shape.num_blocks) * shape.block_size;
  for (int t = 0; t < num_tokens; ++t) {
    if (slots[t] >= capacity) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", t, "] = ", slots[t],
                                                     " is past the cache's ", capacity, " slots"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBuildRequest(int layer, const KvCacheView& cache, const BlockTableView& table,
                                  const CacheShape& sh) {
  if (cache.dtype != sh.dtype || cache.num_blocks != sh.num_blocks ||
      cache.block_size != sh.block_size || cache.num_kv_heads != sh.num_kv_heads ||
      cache.head_dim != sh.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache (", cache.num_blocks, " blocks of ", cache.block_size, ", ", cache.num_kv_heads,
        " KV heads, head_dim ", cache.head_dim, ", ", DTypeName(cache.dtype),
        ") does not match layer ", layer, " (", sh.num_blocks, " blocks of ", sh.block_size, ", ",
        sh.num_kv_heads, " KV heads, head_dim ", sh.head_dim, ", ", DTypeName(sh.dtype), ")"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  return ValidateBlockTable(table, cache.block_size, cache.num_blocks);
}

}  // namespace mempipe
