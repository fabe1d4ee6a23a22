#include "retriever/select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"
#include "core/status_macros.h"
#include "retriever/hierarchical.h"

namespace mempipe {

absl::Status ValidateSelectionConfig(const SelectionConfig& config, int block_size) {
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockSize(block_size));
  MEMPIPE_RETURN_IF_ERROR(ValidateGroupAggregation(config.aggregation));
  if (config.budget_tokens <= 0 || config.budget_tokens % block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget must be a positive multiple of the page size ", block_size,
                     " tokens, got ", config.budget_tokens));
  }
  if (config.num_sink_pages < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sink pages must be >= 0, got ", config.num_sink_pages));
  }
  if (config.num_local_pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "local pages must be >= 1 (the page of the newest token), got ", config.num_local_pages));
  }
  const int k = config.PagesPerHead(block_size);
  if (static_cast<int64_t>(config.num_sink_pages) + config.num_local_pages > k) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget ", config.budget_tokens, " tokens = ", k, " pages cannot hold ",
                     config.num_sink_pages, " sink + ", config.num_local_pages, " local pages"));
  }
  const int f = config.hierarchy.pages_per_super_page;
  if (f != 1 && f != 2 && f != 4 && f != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages per super-page must be 1 (flat), 2, 4 or 8, got ", f));
  }
  if (config.hierarchy.expansion < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hierarchy expansion (super-pages kept per super-page of budget) must be >= 1, got ",
        config.hierarchy.expansion));
  }
  return absl::OkStatus();
}

absl::Status RequireFlatSelection(const SelectionConfig& config, absl::string_view who) {
  if (config.hierarchy.Flat()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(who, " selects flat only; the config asks for super-pages of ",
                   config.hierarchy.pages_per_super_page,
                   " pages (hierarchical selection: retriever/hierarchical.h)"));
}

namespace {

// The order SelectPages ranks scores by, as an unsigned integer: a larger score gets a larger
// key, NaN ranks as -inf, and -0 equals +0 (the float comparison's ties).
inline uint32_t RankKey(float score) {
  if (std::isnan(score)) score = -std::numeric_limits<float>::infinity();
  if (score == 0.0f) score = 0.0f;  // -0 -> +0
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Writes to `out`, ascending, the `want` pages of [lo, hi) with the highest scores, ties to the
// lower page index; returns `want`. Linear: the want-th largest key is found by a radix select
// (four 8-bit digits, most significant first; after the first digit only the keys that share
// the digits so far are revisited), then one ascending pass takes every page above it and the
// first pages equal to it. `keys` and `candidates` are scratch.
int TopPagesAscending(const float* scores, int lo, int hi, int want, std::vector<uint32_t>& keys,
                      std::vector<uint32_t>& candidates, int32_t* out) {
  if (want <= 0) return 0;
  const int n = hi - lo;
  keys.resize(n);
  for (int i = 0; i < n; ++i) keys[i] = RankKey(scores[lo + i]);
  uint32_t prefix = 0;  // digits of the threshold found so far
  int need = want;      // how many of the keys sharing `prefix` still belong to the top
  const std::vector<uint32_t>* pool = &keys;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : ~((uint32_t{1} << (shift + 8)) - 1);
    int hist[256] = {};
    for (uint32_t key : *pool) {
      if ((key & high_mask) == prefix) ++hist[(key >> shift) & 255];
    }
    int digit = 255;
    for (; digit > 0 && hist[digit] < need; --digit) need -= hist[digit];
    prefix |= static_cast<uint32_t>(digit) << shift;
    if (shift == 24) {  // revisit only the keys with this top digit
      candidates.clear();
      for (uint32_t key : keys) {
        if ((key >> 24) == static_cast<uint32_t>(digit)) candidates.push_back(key);
      }
      pool = &candidates;
    }
  }
  // prefix is the want-th largest key; `need` of the pages equal to it are taken.
  int c = 0;
  for (int i = 0; i < n && c < want; ++i) {
    if (keys[i] > prefix || (keys[i] == prefix && need-- > 0)) out[c++] = lo + i;
  }
  return c;
}

}  // namespace

absl::Status SelectPages(const float* scores, const BlockTableView& table, int block_size,
                         int num_kv_heads, const SelectionConfig& config, const SelectionView& out,
                         int num_threads) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(config, "SelectPages (one score per page)"));
  if (scores == nullptr || out.pages == nullptr || out.counts == nullptr) {
    return absl::InvalidArgumentError("scores and selection pointers must not be null");
  }
  if (table.seq_lens == nullptr || table.num_seqs <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs must be positive with seq_lens set, got ", table.num_seqs));
  }
  const int k = config.PagesPerHead(block_size);
  if (out.num_seqs != table.num_seqs || out.num_kv_heads != num_kv_heads || out.max_selected < k) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection is [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected,
                     "]; need [", table.num_seqs, ", ", num_kv_heads, ", >= ", k, "]"));
  }
  for (int s = 0; s < table.num_seqs; ++s) {
    const int32_t len = table.seq_lens[s];
    if (len <= 0 || len > static_cast<int64_t>(table.max_blocks_per_seq) * block_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("seq_lens[", s, "] = ", len, " is outside [1, ",
                       static_cast<int64_t>(table.max_blocks_per_seq) * block_size, "]"));
    }
  }

  // Each (sequence, KV head) row is selected on its own: a range of them per thread, each
  // range with its own scratch.
  ForEachSeqHeads(table.num_seqs, num_kv_heads, num_threads, [&](int s, int h0, int h1) {
    std::vector<uint32_t> keys, candidates;
    const int n = NumPages(table.seq_lens[s], block_size);
    for (int h = h0; h < h1; ++h) {
      int32_t* row = out.Row(s, h);
      std::fill(row, row + out.max_selected, -1);
      if (n <= k) {
        std::iota(row, row + n, 0);
        out.Count(s, h) = n;
        continue;
      }
      const float* sc =
          scores + (static_cast<size_t>(s) * num_kv_heads + h) * table.max_blocks_per_seq;
      const int lo = config.num_sink_pages;
      const int hi = n - config.num_local_pages;  // middle pages are [lo, hi)
      const int want = k - config.num_sink_pages - config.num_local_pages;
      int c = 0;
      for (int p = 0; p < lo; ++p) row[c++] = p;
      c += TopPagesAscending(sc, lo, hi, want, keys, candidates, row + c);
      for (int p = hi; p < n; ++p) row[c++] = p;
      out.Count(s, h) = c;
    }
  });
  return absl::OkStatus();
}

absl::Status ValidateSelection(const SelectionView& sel, const BlockTableView& table,
                               int block_size, const SelectionConfig& config) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, block_size));
  const int k = config.PagesPerHead(block_size);
  if (sel.pages == nullptr || sel.counts == nullptr || table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("selection and seq_lens pointers must not be null");
  }
  if (sel.num_seqs != table.num_seqs || sel.num_seqs < 1 || sel.num_kv_heads < 1 ||
      sel.max_selected < k) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection is [", sel.num_seqs, ", ", sel.num_kv_heads, ", ", sel.max_selected,
                     "]; need [", table.num_seqs, ", >= 1, >= ", k, "]"));
  }
  for (int s = 0; s < sel.num_seqs; ++s) {
    const int32_t len = table.seq_lens[s];
    if (len <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("seq_lens[", s, "] = ", len, " is not >= 1"));
    }
    const int n = NumPages(len, block_size);
    const int want = std::min(n, k);
    const int sinks = n <= k ? n : config.num_sink_pages;
    const int locals = n <= k ? 0 : config.num_local_pages;
    for (int h = 0; h < sel.num_kv_heads; ++h) {
      const int32_t count = sel.Count(s, h);
      if (count != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            "selection count of sequence ", s, " head ", h, " is ", count, "; a sequence of ", n,
            " pages with ", k, " pages per head selects ", want));
      }
      const int32_t* row = sel.Row(s, h);
      for (int i = 0; i < count; ++i) {
        const int32_t p = row[i];
        const char* why = nullptr;
        if (p < 0 || p >= n) {
          why = "outside the sequence's pages";
        } else if (i > 0 && p <= row[i - 1]) {
          why = "not above the previous entry";
        } else if (i < sinks && p != i) {
          why = "not the sink page it should be";
        } else if (i >= count - locals && p != n - (count - i)) {
          why = "not the local page it should be";
        }
        if (why != nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat("selection of sequence ", s, " head ", h, " entry ", i, " = ", p, " is ",
                           why, " (", n, " pages, ", sinks, " sink, ", locals, " local)"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ScoreAndSelect(const QueryView& query, const KvCacheView& cache,
                            const DigestView& digests, const BlockTableView& table,
                            const SelectionConfig& config, const SelectionView& out,
                            int num_threads) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, cache.block_size));
  if (!config.hierarchy.Flat()) {
    MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
    const int f = config.hierarchy.pages_per_super_page;
    const SuperDigestBuffers super(digests, f);
    MEMPIPE_RETURN_IF_ERROR(BuildSuperDigests(digests, table, cache.block_size, f, super.view()));
    return SelectHierarchical(query, cache, digests, super.view(), table, config, out);
  }
  std::vector<float> scores(static_cast<size_t>(table.num_seqs) * cache.num_kv_heads *
                            std::max(table.max_blocks_per_seq, 0));
  MEMPIPE_RETURN_IF_ERROR(ComputeRelevancy(query, cache, digests, table, config.aggregation,
                                           scores.data(), num_threads));
  return SelectPages(scores.data(), table, cache.block_size, cache.num_kv_heads, config, out,
                     num_threads);
}

}  // namespace mempipe
