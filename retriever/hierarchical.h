// mempipe retriever: two-level (hierarchical) page selection, the CPU reference.
//
// Pages are grouped into super-pages of f = config.hierarchy.pages_per_super_page consecutive
// pages (f = 4 at page size 16: LServe's 16-in-64 geometry). A super-page's digest is the
// channel-wise max/min over its pages' digests, i.e. the digest of its f x block_size tokens.
// Selection scans the super-page digests first and the page digests of the best super-pages
// only, so it reads about 1/f of the flat scan's bytes plus the chosen super-pages' pages.
//
// Layout (as LServe's 64-token physical pages holding 16-token logical pages): super-block b
// is the physical blocks [b*f, (b+1)*f), and every sequence maps each group of f logical pages
// f*j .. f*j+f-1 onto one such group, in order (ValidateSuperPageTable). The super digests are
// then indexed by physical super-block, like the page digests by block, and a selector can
// keep them current from the slots alone:
//   super digests [ceil(num_blocks / f), 2, num_kv_heads, head_dim] in the cache dtype
//
// The selection, for one (sequence, KV head) with n pages and k = budget / block_size:
//  1. n <= k: every page, nothing scored (as the flat selection).
//  2. The sink pages [0, sinks) and local pages [n - locals, n) are kept; want = k - sinks -
//     locals slots remain for the middle pages [sinks, n - locals).
//  3. Pass 1 scores every super-page that holds a middle page with the Quest bound of its
//     digest (retriever/relevancy.h: canonical order, group aggregation as configured) and ranks
//     them by score, ties to the lower super-page index, NaN last. It keeps the shortest prefix
//     of that ranking holding at least M = expansion x ceil(want / f) super-pages and at least
//     `want` middle pages (all candidates when fewer).
//  4. Pass 2 scores the middle pages of the kept super-pages and keeps the `want` best, ties to
//     the lower page index (the flat selection's rule), NaN last.
// Output as SelectPages: sinks, chosen pages, locals, ascending logical page indices. Since the
// bound of a super-page bounds each of its pages' bounds, a super-page dropped in pass 1 could
// only have contributed pages whose bound is below its own; when pass 1 keeps every candidate
// the result is exactly the flat selection.
//
//   MEMPIPE_RETURN_IF_ERROR(BuildSuperDigests(page_digests, table, block_size, f, super));
//   MEMPIPE_RETURN_IF_ERROR(
//       SelectHierarchical(query, geometry, page_digests, super, table, config, out, &stats));
#ifndef MEMPIPE_RETRIEVER_HIERARCHICAL_H_
#define MEMPIPE_RETRIEVER_HIERARCHICAL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {

// Parses a hierarchy name for `block_size`: "none" (flat) or "<P>in<S>" with P == block_size
// and S / P in {2, 4, 8} pages per super-page ("16in64" at page 16). InvalidArgument naming the
// value otherwise.
absl::StatusOr<PageHierarchy> ParsePageHierarchy(absl::string_view name, int block_size);
// "none" or "<block_size>in<block_size * pages_per_super_page>".
std::string PageHierarchyName(const PageHierarchy& hierarchy, int block_size);

inline int NumSuperBlocks(int num_blocks, int pages_per_super_page) {
  return (num_blocks + pages_per_super_page - 1) / pages_per_super_page;
}

// The super digests' view over `data` for page digests `pages`: same dtype, format, heads and
// head_dim, NumSuperBlocks(pages.num_blocks, f) blocks. (kInt8 super digests also need their
// `scales` and `exact`: SuperDigestBuffers allocates all three.)
DigestView SuperDigestView(void* data, const DigestView& pages, int pages_per_super_page);

// Storage for the super digests of `pages` (any format): int8 super digests are quantized from
// their exact super rows exactly as page digests are (retriever/int8_quant.h).
class SuperDigestBuffers {
 public:
  SuperDigestBuffers() = default;
  SuperDigestBuffers(const DigestView& pages, int pages_per_super_page);
  const DigestView& view() const { return view_; }

 private:
  std::vector<uint8_t> data_, exact_;
  std::vector<float> scales_;
  DigestView view_;
};

// Checks that every sequence of `table` maps each group of f logical pages onto one aligned
// group of f physical blocks in order: Block(s, f*j + i) == Block(s, f*j) + i with
// Block(s, f*j) % f == 0, for every page the sequence uses. InvalidArgument naming the sequence,
// page and block otherwise.
[[nodiscard]] absl::Status ValidateSuperPageTable(const BlockTableView& table, int block_size,
                                                  int pages_per_super_page);

// Bulk build from the page digests (after BuildDigests): for every super-page of every
// sequence, max/min over the digests of its pages that hold tokens, in page order. Other
// super-blocks are left untouched.
[[nodiscard]] absl::Status BuildSuperDigests(const DigestView& pages, const BlockTableView& table,
                                             int block_size, int pages_per_super_page,
                                             const DigestView& super);

// Incremental update, token by token in append order: the page digest as UpdateDigestsFromKeys,
// then the super digest from the updated page row: a token at offset 0 of its super-block
// resets the super row to the page row, any other token widens it with the page row. Equals
// BuildDigests + BuildSuperDigests bit for bit.
//   keys [num_tokens, num_kv_heads, head_dim] in the digest dtype; slot_mapping [num_tokens]
//   int64, negative entries skipped
[[nodiscard]] absl::Status UpdateHierarchicalDigests(const DigestView& pages,
                                                     const DigestView& super, int block_size,
                                                     int pages_per_super_page,
                                                     const int64_t* slot_mapping, int num_tokens,
                                                     const void* keys);

// What a selection read, summed over its (sequence, KV head) rows.
struct HierarchyStats {
  int64_t super_rows_scored = 0;  // super-page digests scored in pass 1
  int64_t page_rows_scored = 0;   // page digests scored in pass 2
  int64_t flat_page_rows = 0;     // page digests the flat selection scores (every page)
  int64_t kept_super_pages = 0;   // super-pages pass 1 kept
};

// Steps 2 and 3, two-level, as described above. `cache` gives the geometry only (its data is
// not read). `config.hierarchy` must not be flat; `stats` may be null. Errors: the checks of
// ComputeRelevancy and SelectPages, ValidateSuperPageTable, a super digest view that does not
// match the page digests. `row_stats`, when given, receives each (sequence, KV head) row's
// figures [num_seqs * num_kv_heads] (what a device prices per compute unit).
[[nodiscard]] absl::Status SelectHierarchical(const QueryView& query, const KvCacheView& cache,
                                              const DigestView& pages, const DigestView& super,
                                              const BlockTableView& table,
                                              const SelectionConfig& config,
                                              const SelectionView& out,
                                              HierarchyStats* stats = nullptr, int num_threads = 1,
                                              std::vector<HierarchyStats>* row_stats = nullptr);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_HIERARCHICAL_H_
