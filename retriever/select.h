// mempipe retriever, step 3 (retrieval): top-k pages per (sequence, KV head).
//
// A token budget B gives k = B / block_size pages per (sequence, KV head). The first
// `num_sink_pages` and the last `num_local_pages` (the partial page included) are always kept;
// the remaining k - sinks - locals slots take the highest-scoring middle pages. Ties go to the
// lower page index, so the selection is deterministic. A sequence with at most k pages selects
// every page. Output page indices are logical (index into the sequence's block table row),
// ascending.
//
//   selected [num_seqs, num_kv_heads, max_selected] int32 logical page indices
//   counts   [num_seqs, num_kv_heads] int32 valid entries per row; the rest are -1
#ifndef MEMPIPE_RETRIEVER_SELECT_H_
#define MEMPIPE_RETRIEVER_SELECT_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "core/paged_kv.h"
#include "retriever/relevancy.h"

namespace mempipe {

// Two-level selection (retriever/hierarchical.h): score super-pages of `pages_per_super_page`
// consecutive pages first, then only the pages inside the best ones. 1 is the flat selection of
// this file; 4 at page size 16 is LServe's 16-in-64 geometry ("16in64").
struct PageHierarchy {
  int pages_per_super_page = 1;  // 1 (flat), 2, 4 or 8
  // Super-pages kept for the second pass: expansion x ceil(middle slots / pages_per_super_page)
  // (more if those hold fewer middle pages than the slots to fill). >= 1.
  int expansion = 2;

  bool Flat() const { return pages_per_super_page == 1; }
};

struct SelectionConfig {
  int budget_tokens = 4096;  // tokens kept per (sequence, KV head); a multiple of block_size
  int num_sink_pages = 1;
  int num_local_pages = 1;
  GroupAggregation aggregation = GroupAggregation::kMax;
  PageHierarchy hierarchy = {};  // flat unless set; only hierarchy-aware selectors accept others

  int PagesPerHead(int block_size) const { return budget_tokens / block_size; }
};

// Checks budget > 0, a multiple of block_size, room for the sink and local pages, and the
// hierarchy's sizes (pages_per_super_page in {1, 2, 4, 8}, expansion >= 1).
[[nodiscard]] absl::Status ValidateSelectionConfig(const SelectionConfig& config, int block_size);

// InvalidArgument naming `who` and the super-page size unless `config` is flat: what every
// selector without a hierarchical path (SelectPages, the GPU kernels, the HLS kernels) returns
// instead of silently selecting flat.
[[nodiscard]] absl::Status RequireFlatSelection(const SelectionConfig& config,
                                                absl::string_view who);

struct SelectionView {
  int32_t* pages = nullptr;   // [num_seqs, num_kv_heads, max_selected]
  int32_t* counts = nullptr;  // [num_seqs, num_kv_heads]
  int num_seqs = 0;
  int num_kv_heads = 0;
  int max_selected = 0;  // >= config.PagesPerHead(block_size)

  int32_t* Row(int seq, int head) const {
    return pages + (static_cast<size_t>(seq) * num_kv_heads + head) * max_selected;
  }
  int32_t& Count(int seq, int head) const {
    return counts[static_cast<size_t>(seq) * num_kv_heads + head];
  }
};

// Selects from `scores` [num_seqs, num_kv_heads, table.max_blocks_per_seq] (ComputeRelevancy).
// The (sequence, KV head) rows are independent: with num_threads > 1 they are split over the
// host's parallel-for (core/parallel.h; fewer than 1 counts as 1); the selection is the same
// for any thread count.
[[nodiscard]] absl::Status SelectPages(const float* scores, const BlockTableView& table,
                                       int block_size, int num_kv_heads,
                                       const SelectionConfig& config, const SelectionView& out,
                                       int num_threads = 1);

// Checks a selection that came from elsewhere (another device, another process) before anything
// trusts it: the shape SelectPages gives every (sequence, KV head) row of `table`. A sequence
// of n <= k pages selects exactly pages 0..n-1; a longer one exactly k pages, strictly
// ascending, inside [0, n), starting with the sink pages 0..sinks-1 and ending with the local
// pages n-locals..n-1. InvalidArgument naming the sequence, head, entry and value otherwise.
// (It cannot tell whether the middle pages are the best ones; that needs the scores.)
[[nodiscard]] absl::Status ValidateSelection(const SelectionView& sel, const BlockTableView& table,
                                             int block_size, const SelectionConfig& config);

// Steps 2 and 3 together: what every placement's selector computes. A hierarchical config runs
// the two-level reference (retriever/hierarchical.h), its super-page digests built on the spot
// from `digests`, on one thread. A flat config scores (ComputeRelevancy) and selects
// (SelectPages) on `num_threads` host threads; the result does not depend on the count.
[[nodiscard]] absl::Status ScoreAndSelect(const QueryView& query, const KvCacheView& cache,
                                          const DigestView& digests, const BlockTableView& table,
                                          const SelectionConfig& config, const SelectionView& out,
                                          int num_threads = 1);

// ScoreAndSelect, then `rows_selected(first, last)` as soon as rows [first, last) of `out` (row r
// is sequence r / num_kv_heads, KV head r % num_kv_heads) are written: with a flat config on the
// thread that selected them, inside the same parallel call (ComputeRelevancyThen's ranges;
// backend/host_sparse_layer.h attends them there); with a hierarchical one once, for every row,
// on the calling thread after the whole selection. It must not throw.
[[nodiscard]] absl::Status ScoreAndSelectThen(
    const QueryView& query, const KvCacheView& cache, const DigestView& digests,
    const BlockTableView& table, const SelectionConfig& config, const SelectionView& out,
    int num_threads, absl::FunctionRef<void(int64_t first, int64_t last)> rows_selected);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_SELECT_H_
