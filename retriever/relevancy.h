// mempipe retriever, step 2 (compute relevancy): the Quest upper bound per page and KV head.
//
// For query head h and page p with digest (mx, mn), the bound on q.k for every key of the page is
//   s(h, p) = sum_c max(q_c * mx_c, q_c * mn_c)
// and a KV head's score aggregates the s of the query heads of its GQA group (max, or sum).
//
// Canonical order (bit-exact across CPU, GPU and FPGA). Products and sums are fp32 with no
// fused multiply-add. Channel c goes to lane c % 32; each lane adds its terms in increasing c;
// the 32 lanes then reduce pairwise, lane[i] += lane[i + s] for s = 16, 8, 4, 2, 1, and lane 0
// is s. (A warp's xor-butterfly and an HLS adder tree give exactly this.) The group's heads
// aggregate in increasing head order. Int8 digests (digest.h) enter as their dequantized rows,
// fl(q * s) per element, and then follow the same order. Every implementation follows this order,
// so their scores, and hence their selections, agree exactly.
//
//   scores [num_seqs, num_kv_heads, max_blocks_per_seq] fp32; entries past a sequence's last
//   page are -inf.
#ifndef MEMPIPE_RETRIEVER_RELEVANCY_H_
#define MEMPIPE_RETRIEVER_RELEVANCY_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"

namespace mempipe {

enum class GroupAggregation : int { kMax = 0, kSum = 1 };
absl::StatusOr<GroupAggregation> ParseGroupAggregation(absl::string_view name);  // "max"|"sum"
absl::string_view GroupAggregationName(GroupAggregation agg);
// InvalidArgument naming the value unless `agg` is kMax or kSum (an enum cast from a bad int
// must not silently mean "sum"). Every device's relevancy entry point calls it.
[[nodiscard]] absl::Status ValidateGroupAggregation(GroupAggregation agg);

inline constexpr int kScoreLanes = 32;

// Queries of one decode step.
struct QueryView {
  const void* data = nullptr;  // [num_seqs, num_heads, head_dim] in `dtype`, contiguous
  DType dtype = DType::kFloat32;
  int num_seqs = 0;
  int num_heads = 0;
  int head_dim = 0;
};

// Checks the query's sizes against the cache (num_heads a multiple of num_kv_heads, same
// head_dim, num_seqs equal to the table's) and that every element is finite (naming the
// first sequence, head and channel that is not).
[[nodiscard]] absl::Status ValidateQuery(const QueryView& query, const KvCacheView& cache,
                                         const BlockTableView& table);

// s(h, p) in the canonical order: `q` and the digest rows are fp32 arrays of `head_dim`.
float PageBound(const float* q, const float* max_row, const float* min_row, int head_dim);

// Scores every page of every (sequence, KV head) with the AVX-512 or the portable scan
// (core/cpu_kernel.h; both in the canonical order, so bit-identical), splitting the
// (sequence, KV head) pairs over `num_threads` host threads of the reused pool, and each
// pair's pages too when there are more threads than pairs (the scores do not depend on it).
[[nodiscard]] absl::Status ComputeRelevancy(const QueryView& query, const KvCacheView& cache,
                                            const DigestView& digests, const BlockTableView& table,
                                            GroupAggregation agg, float* scores,
                                            int num_threads = 1);

// ComputeRelevancy, and `rows_done(first, last)` as soon as rows [first, last) (row r is sequence
// r / num_kv_heads, KV head r % num_kv_heads) have all their scores written: on the thread that
// wrote the last of them, inside the same parallel call, with every one of their scores visible
// to it. Every row is in exactly one such range: a thread's whole share of the rows where there
// are no more threads than rows, else one row, reported by whichever thread finishes its last
// chunk of pages. ScoreAndSelect selects each range there, so steps 2 and 3 cost one call on the
// host threads instead of two. `rows_done` must not throw.
[[nodiscard]] absl::Status ComputeRelevancyThen(
    const QueryView& query, const KvCacheView& cache, const DigestView& digests,
    const BlockTableView& table, GroupAggregation agg, float* scores, int num_threads,
    absl::FunctionRef<void(int64_t first, int64_t last)> rows_done);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_RELEVANCY_H_
