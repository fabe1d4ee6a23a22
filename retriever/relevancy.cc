#include "retriever/relevancy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"
#include "retriever/int8_quant.h"

namespace mempipe {

absl::StatusOr<GroupAggregation> ParseGroupAggregation(absl::string_view name) {
  if (name == "max") return GroupAggregation::kMax;
  if (name == "sum") return GroupAggregation::kSum;
  return absl::InvalidArgumentError(
      absl::StrCat("group aggregation must be 'max' or 'sum', got '", name, "'"));
}

absl::string_view GroupAggregationName(GroupAggregation agg) {
  return agg == GroupAggregation::kMax ? "max" : "sum";
}

absl::Status ValidateGroupAggregation(GroupAggregation agg) {
  if (agg != GroupAggregation::kMax && agg != GroupAggregation::kSum) {
    return absl::InvalidArgumentError(absl::StrCat("group aggregation code ", static_cast<int>(agg),
                                                   " is neither max (0) nor sum (1)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateQuery(const QueryView& query, const KvCacheView& cache,
                           const BlockTableView& table) {
  if (query.data == nullptr) return absl::InvalidArgumentError("query pointer is null");
  if (query.num_seqs != table.num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query has ", query.num_seqs, " sequences but the block table has ", table.num_seqs));
  }
  if (query.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("query head_dim ", query.head_dim,
                                                   " differs from the cache's ", cache.head_dim));
  }
  if (query.num_heads <= 0 || query.num_heads % cache.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_heads ", query.num_heads,
                                                   " must be a positive multiple of num_kv_heads ",
                                                   cache.num_kv_heads));
  }
  const size_t n = static_cast<size_t>(query.num_seqs) * query.num_heads * query.head_dim;
  for (size_t i = 0; i < n; ++i) {
    const float v = LoadAsFloat(query.data, query.dtype, i);
    if (!std::isfinite(v)) {
      const size_t row = i / query.head_dim;
      return absl::InvalidArgumentError(
          absl::StrCat("query[", row / query.num_heads, "][", row % query.num_heads, "][",
                       i % query.head_dim, "] is ", v, "; queries must be finite"));
    }
  }
  return absl::OkStatus();
}

float PageBound(const float* q, const float* max_row, const float* min_row, int head_dim) {
  float lane[kScoreLanes] = {};
  int c0 = 0;
  for (; c0 + kScoreLanes <= head_dim; c0 += kScoreLanes) {
    for (int i = 0; i < kScoreLanes; ++i) {
      const float a = q[c0 + i] * max_row[c0 + i];
      const float b = q[c0 + i] * min_row[c0 + i];
      lane[i] += a > b ? a : b;
    }
  }
  for (int i = 0; c0 + i < head_dim; ++i) {  // head_dim not a multiple of the lane count
    const float a = q[c0 + i] * max_row[c0 + i];
    const float b = q[c0 + i] * min_row[c0 + i];
    lane[i] += a > b ? a : b;
  }
  for (int stride = kScoreLanes / 2; stride > 0; stride /= 2) {
    for (int i = 0; i < stride; ++i) lane[i] += lane[i + stride];
  }
  return lane[0];
}

absl::Status ComputeRelevancy(const QueryView& query, const KvCacheView& cache,
                              const DigestView& digests, const BlockTableView& table,
                              GroupAggregation agg, float* scores, int num_threads) {
  MEMPIPE_RETURN_IF_ERROR(ValidateGroupAggregation(agg));
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(query, cache, table));
  if (scores == nullptr) return absl::InvalidArgumentError("scores pointer is null");

  const int d = cache.head_dim;
  const int groups = query.num_heads / cache.num_kv_heads;
  const int kvh = cache.num_kv_heads;
  // Tasks: every (sequence, KV head) row, each split into `chunks` page ranges when there are
  // more threads than rows (a batch of one on a many-core host: one head's scan would otherwise
  // bound the call). Each page's score is computed by the same code whatever the split.
  const int64_t rows = static_cast<int64_t>(table.num_seqs) * kvh;
  // The split follows the threads asked for (the pool runs the tasks on the threads it has).
  const int64_t asked = std::max(num_threads, 1);
  const int64_t threads = std::min<int64_t>(asked, ThreadPool::DefaultMaxWorkers() + 1);
  constexpr int kMinPagesPerTask = 4;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>((asked + rows - 1) / std::max<int64_t>(rows, 1),
                           (table.max_blocks_per_seq + kMinPagesPerTask - 1) / kMinPagesPerTask));
  DispatchDType(cache.dtype, [&]<typename T>() {
    const T* dg = static_cast<const T*>(digests.data);
    // Pages [p0, p1) of row (s, h), and the -inf tail past the sequence's pages when p1 is the
    // row's end.
    auto score = [&](int s, int h, int p0, int p1) {
      std::vector<float> q(static_cast<size_t>(groups) * d), mx(d), mn(d);
      const int pages = NumPages(table.seq_lens[s], cache.block_size);
      const size_t qrow0 = static_cast<size_t>(s) * query.num_heads + h * groups;
      for (size_t i = 0; i < q.size(); ++i) {
        q[i] = LoadAsFloat(query.data, query.dtype, qrow0 * d + i);
      }
      float* out = scores + (static_cast<size_t>(s) * kvh + h) * table.max_blocks_per_seq;
      for (int p = p0; p < std::min(p1, pages); ++p) {
        const int block = table.Block(s, p);
        if (digests.format == DigestFormat::kInt8) {
          // The dequantized bound: one fp32 multiply per element (int8_quant.h).
          const int8_t* q8 = static_cast<const int8_t*>(digests.data);
          const int8_t* qmx = q8 + digests.Offset(block, 0, h);
          const int8_t* qmn = q8 + digests.Offset(block, 1, h);
          const float scale = digests.scales[digests.ScaleIndex(block, h)];
          for (int c = 0; c < d; ++c) {
            mx[c] = int8_digest::Dequantize(qmx[c], scale);
            mn[c] = int8_digest::Dequantize(qmn[c], scale);
          }
        } else {
          const T* dmx = dg + digests.Offset(block, 0, h);
          const T* dmn = dg + digests.Offset(block, 1, h);
          for (int c = 0; c < d; ++c) {
            mx[c] = ToFloat(dmx[c]);
            mn[c] = ToFloat(dmn[c]);
          }
        }
        float agg_score = 0.0f;
        for (int g = 0; g < groups; ++g) {
          const float v = PageBound(&q[static_cast<size_t>(g) * d], mx.data(), mn.data(), d);
          if (g == 0) {
            agg_score = v;
          } else if (agg == GroupAggregation::kMax) {
            agg_score = v > agg_score ? v : agg_score;
          } else {
            agg_score += v;
          }
        }
        out[p] = agg_score;
      }
      for (int p = std::max(p0, pages); p < p1; ++p) {
        out[p] = -std::numeric_limits<float>::infinity();
      }
    };
    if (chunks == 1) {
      ForEachSeqHeads(table.num_seqs, kvh, num_threads, [&](int s, int h0, int h1) {
        for (int h = h0; h < h1; ++h) score(s, h, 0, table.max_blocks_per_seq);
      });
      return;
    }
    const int64_t tasks = rows * chunks;
    ThreadPool::Default().ParallelFor(
        static_cast<int>(tasks), static_cast<int>(std::min(threads, tasks)), [&](int t) {
          const int64_t row = t / chunks, c = t % chunks;
          const int64_t width = table.max_blocks_per_seq;
          score(static_cast<int>(row / kvh), static_cast<int>(row % kvh),
                static_cast<int>(width * c / chunks), static_cast<int>(width * (c + 1) / chunks));
        });
  });
  return absl::OkStatus();
}

}  // namespace mempipe
