#include "retriever/hierarchical.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/parallel.h"
#include "core/status_macros.h"
#include "retriever/int8_quant.h"

namespace mempipe {
namespace {

// Widens (mx, mn) with the row pair (src_mx, src_mn); max/min pick stored values through fp32,
// so every dtype stays exact. The first of equal values is kept (strict comparisons), as in
// the page digests.
template <typename T>
void WidenWithRow(const T* src_mx, const T* src_mn, T* mx, T* mn, int head_dim) {
  for (int c = 0; c < head_dim; ++c) {
    if (ToFloat(src_mx[c]) > ToFloat(mx[c])) mx[c] = src_mx[c];
    if (ToFloat(src_mn[c]) < ToFloat(mn[c])) mn[c] = src_mn[c];
  }
}

// The exact (native) rows of a digest view: itself for kNative, its `exact` array for kInt8.
DigestView NativeRows(const DigestView& v) {
  DigestView n = v;
  if (v.format == DigestFormat::kInt8) n.data = v.exact;
  n.format = DigestFormat::kNative;
  n.scales = nullptr;
  n.exact = nullptr;
  return n;
}

// Re-quantizes the touched super-blocks of an int8 super view (no-op for kNative).
absl::Status QuantizeTouched(const DigestView& super, std::vector<int32_t>& touched) {
  if (super.format != DigestFormat::kInt8 || touched.empty()) return absl::OkStatus();
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  return QuantizeDigestBlocks(super, touched.data(), static_cast<int>(touched.size()));
}

absl::Status CheckSuperView(const DigestView& pages, const DigestView& super, int f) {
  if (pages.data == nullptr || super.data == nullptr) {
    return absl::InvalidArgumentError("page and super-page digest pointers must not be null");
  }
  if (super.format != pages.format) {
    return absl::InvalidArgumentError(
        absl::StrCat("super-page digests are ", DigestFormatName(super.format),
                     " but the page digests ", DigestFormatName(pages.format)));
  }
  if (super.format == DigestFormat::kInt8 && (super.scales == nullptr || super.exact == nullptr ||
                                              pages.scales == nullptr || pages.exact == nullptr)) {
    return absl::InvalidArgumentError("int8 page and super-page digests need scales and exact");
  }
  if (f != 2 && f != 4 && f != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages per super-page must be 2, 4 or 8, got ", f));
  }
  if (super.dtype != pages.dtype || super.num_kv_heads != pages.num_kv_heads ||
      super.head_dim != pages.head_dim || super.num_blocks != NumSuperBlocks(pages.num_blocks, f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "super-page digests [", super.num_blocks, ", 2, ", super.num_kv_heads, ", ", super.head_dim,
        "] ", DTypeName(super.dtype), " do not match ", pages.num_blocks, " page digests of ",
        pages.num_kv_heads, " KV heads, head_dim ", pages.head_dim, ", ", DTypeName(pages.dtype),
        " at ", f, " pages per super-page (need ", NumSuperBlocks(pages.num_blocks, f),
        " super-blocks)"));
  }
  return absl::OkStatus();
}

float NanLast(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

}  // namespace

absl::StatusOr<PageHierarchy> ParsePageHierarchy(absl::string_view name, int block_size) {
  PageHierarchy h;
  if (name == "none") return h;
  std::vector<absl::string_view> parts = absl::StrSplit(name, "in");
  int page = 0, super = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &page) ||
      !absl::SimpleAtoi(parts[1], &super)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hierarchy must be 'none' or '<page>in<super-page>' in tokens (e.g. '16in64'), got '", name,
        "'"));
  }
  if (page != block_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hierarchy '", name, "' has ", page, "-token pages but the page size is ", block_size));
  }
  if (super % page != 0 || (super / page != 2 && super / page != 4 && super / page != 8)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hierarchy '", name, "': a super-page must be 2, 4 or 8 pages of ", page, " tokens"));
  }
  h.pages_per_super_page = super / page;
  return h;
}

std::string PageHierarchyName(const PageHierarchy& hierarchy, int block_size) {
  if (hierarchy.Flat()) return "none";
  return absl::StrCat(block_size, "in", block_size * hierarchy.pages_per_super_page);
}

DigestView SuperDigestView(void* data, const DigestView& pages, int f) {
  DigestView v{data, pages.dtype, NumSuperBlocks(pages.num_blocks, std::max(f, 1)),
               pages.num_kv_heads, pages.head_dim};
  v.format = pages.format;
  return v;
}

SuperDigestBuffers::SuperDigestBuffers(const DigestView& pages, int f) {
  view_ = SuperDigestView(nullptr, pages, f);
  data_.assign(view_.NumBytes(), 0);
  scales_.assign(view_.ScaleBytes() / sizeof(float), 0.0f);
  exact_.assign(view_.ExactBytes(), 0);
  view_.data = data_.data();
  if (view_.format == DigestFormat::kInt8) {
    view_.scales = scales_.data();
    view_.exact = exact_.data();
  }
}

absl::Status ValidateSuperPageTable(const BlockTableView& table, int block_size, int f) {
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTableShape(table));
  if (f < 1) {
    return absl::InvalidArgumentError(absl::StrCat("pages per super-page must be >= 1, got ", f));
  }
  for (int s = 0; s < table.num_seqs; ++s) {
    const int n = NumPages(table.seq_lens[s], block_size);
    for (int p = 0; p < n && p < table.max_blocks_per_seq; ++p) {
      const int32_t first = table.Block(s, p - p % f);
      const int32_t expect = first + p % f;
      if (first % f != 0 || table.Block(s, p) != expect) {
        return absl::InvalidArgumentError(absl::StrCat(
            "block table of sequence ", s, " maps page ", p, " to block ", table.Block(s, p),
            "; super-pages of ", f, " pages need each group of ", f,
            " logical pages in one aligned group of ", f, " physical blocks (page ", p - p % f,
            " at block ", first, ", a multiple of ", f, ", and page ", p, " at block ",
            first % f == 0 ? absl::StrCat(expect) : std::string("-"), ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status BuildSuperDigests(const DigestView& pages, const BlockTableView& table, int block_size,
                               int f, const DigestView& super) {
  MEMPIPE_RETURN_IF_ERROR(CheckSuperView(pages, super, f));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, block_size, pages.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateSuperPageTable(table, block_size, f));
  const DigestView pages_in = pages, super_in = super;
  std::vector<int32_t> touched;
  {
    const DigestView pages = NativeRows(pages_in), super = NativeRows(super_in);
    DispatchDType(pages.dtype, [&]<typename T>() {
      const T* pg = static_cast<const T*>(pages.data);
      T* sp = static_cast<T*>(super.data);
      const size_t row = pages.head_dim;
      for (int s = 0; s < table.num_seqs; ++s) {
        const int n = NumPages(table.seq_lens[s], block_size);
        for (int p0 = 0; p0 < n; p0 += f) {
          const int sb = table.Block(s, p0) / f;
          touched.push_back(sb);
          for (int h = 0; h < pages.num_kv_heads; ++h) {
            T* mx = sp + super.Offset(sb, 0, h);
            T* mn = sp + super.Offset(sb, 1, h);
            const int b0 = table.Block(s, p0);
            std::copy(pg + pages.Offset(b0, 0, h), pg + pages.Offset(b0, 0, h) + row, mx);
            std::copy(pg + pages.Offset(b0, 1, h), pg + pages.Offset(b0, 1, h) + row, mn);
            for (int p = p0 + 1; p < std::min(n, p0 + f); ++p) {
              const int b = table.Block(s, p);
              WidenWithRow(pg + pages.Offset(b, 0, h), pg + pages.Offset(b, 1, h), mx, mn,
                           pages.head_dim);
            }
          }
        }
      }
    });
  }
  return QuantizeTouched(super_in, touched);
}

absl::Status UpdateHierarchicalDigests(const DigestView& pages, const DigestView& super,
                                       int block_size, int f, const int64_t* slot_mapping,
                                       int num_tokens, const void* keys) {
  MEMPIPE_RETURN_IF_ERROR(CheckSuperView(pages, super, f));
  // Checks slots, sizes and pointers for the whole call before anything is written.
  MEMPIPE_RETURN_IF_ERROR(UpdateDigestsFromKeys(pages, block_size, slot_mapping, 0, keys));
  if (num_tokens < 0 || (num_tokens > 0 && (slot_mapping == nullptr || keys == nullptr))) {
    return absl::InvalidArgumentError(
        absl::StrCat("need num_tokens >= 0 (got ", num_tokens, ") and non-null slots and keys"));
  }
  const int64_t num_slots = static_cast<int64_t>(pages.num_blocks) * block_size;
  for (int t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", t, "] = ", slot_mapping[t],
                                                     " is past the cache's ", num_slots, " slots"));
    }
  }
  const size_t key_row_bytes =
      static_cast<size_t>(pages.num_kv_heads) * pages.head_dim * DTypeSize(pages.dtype);
  const int64_t super_tokens = static_cast<int64_t>(block_size) * f;
  // Super row update of token t from its page's current (exact) row.
  const DigestView page_rows = NativeRows(pages), super_rows = NativeRows(super);
  std::vector<int32_t> touched;
  auto update_super = [&](int64_t slot) {
    const int block = static_cast<int>(slot / block_size);
    const int sb = static_cast<int>(slot / super_tokens);
    const bool reset = slot % super_tokens == 0;
    touched.push_back(sb);
    DispatchDType(pages.dtype, [&]<typename T>() {
      const T* pg = static_cast<const T*>(page_rows.data);
      T* sp = static_cast<T*>(super_rows.data);
      for (int h = 0; h < pages.num_kv_heads; ++h) {
        const T* pmx = pg + pages.Offset(block, 0, h);
        const T* pmn = pg + pages.Offset(block, 1, h);
        T* mx = sp + super.Offset(sb, 0, h);
        T* mn = sp + super.Offset(sb, 1, h);
        if (reset) {
          std::copy(pmx, pmx + pages.head_dim, mx);
          std::copy(pmn, pmn + pages.head_dim, mn);
        } else {
          WidenWithRow(pmx, pmn, mx, mn, pages.head_dim);
        }
      }
    });
  };
  // NOTE: when every super-block's tokens arrive in increasing slot order (appends, bulk
  // builds), widening the super row with a page's final row once per run of tokens in that page
  // equals the token-by-token definition (max/min are idempotent and keep the first of equal
  // values, and page rows only widen); otherwise apply the definition token by token.
  std::unordered_map<int64_t, int64_t> last_slot;
  bool in_order = true;
  for (int t = 0; t < num_tokens && in_order; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    auto [it, fresh] = last_slot.try_emplace(slot / super_tokens, slot);
    if (!fresh) {
      in_order = slot > it->second;
      it->second = slot;
    }
  }
  if (in_order) {
    MEMPIPE_RETURN_IF_ERROR(
        UpdateDigestsFromKeys(pages, block_size, slot_mapping, num_tokens, keys));
    int64_t prev_block = -1;
    for (int t = 0; t < num_tokens; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;
      if (slot / block_size == prev_block && slot % super_tokens != 0) continue;
      prev_block = slot / block_size;
      update_super(slot);
    }
    return QuantizeTouched(super, touched);
  }
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    MEMPIPE_RETURN_IF_ERROR(
        UpdateDigestsFromKeys(pages, block_size, &slot_mapping[t], 1,
                              static_cast<const uint8_t*>(keys) + t * key_row_bytes));
    update_super(slot);
  }
  return QuantizeTouched(super, touched);
}

absl::Status SelectHierarchical(const QueryView& query, const KvCacheView& cache,
                                const DigestView& pages, const DigestView& super,
                                const BlockTableView& table, const SelectionConfig& config,
                                const SelectionView& out, HierarchyStats* stats, int num_threads,
                                std::vector<HierarchyStats>* row_stats) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, cache.block_size));
  const int f = config.hierarchy.pages_per_super_page;
  if (config.hierarchy.Flat()) {
    return absl::InvalidArgumentError(
        "SelectHierarchical needs a hierarchical config (pages_per_super_page > 1)");
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, pages));
  MEMPIPE_RETURN_IF_ERROR(CheckSuperView(pages, super, f));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateSuperPageTable(table, cache.block_size, f));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(query, cache, table));
  const int k = config.PagesPerHead(cache.block_size);
  if (out.pages == nullptr || out.counts == nullptr || out.num_seqs != table.num_seqs ||
      out.num_kv_heads != cache.num_kv_heads || out.max_selected < k) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection is [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected,
                     "] (pointers ", out.pages ? "set" : "null", "); need [", table.num_seqs, ", ",
                     cache.num_kv_heads, ", >= ", k, "]"));
  }

  const int d = cache.head_dim;
  const int groups = query.num_heads / cache.num_kv_heads;
  const GroupAggregation agg = config.aggregation;
  const size_t rows = static_cast<size_t>(table.num_seqs) * cache.num_kv_heads;
  std::vector<HierarchyStats> per_row(rows);
  DispatchDType(cache.dtype, [&]<typename T>() {
    ForEachSeqHeads(table.num_seqs, cache.num_kv_heads, num_threads, [&](int s, int h0, int h1) {
      std::vector<float> q(static_cast<size_t>(groups) * d), mx(d), mn(d);
      std::vector<int32_t> cand;
      std::vector<float> cand_score, page_score;
      std::vector<int32_t> middle;
      const int n = NumPages(table.seq_lens[s], cache.block_size);
      // The group's aggregated bound of (block, h) in `v` (canonical order; int8 digests give
      // their dequantized bound, one fp32 multiply per element, as ComputeRelevancy).
      auto score = [&](const DigestView& v, int block, int h) {
        if (v.format == DigestFormat::kInt8) {
          const int8_t* q8 = static_cast<const int8_t*>(v.data);
          const float sc = v.scales[v.ScaleIndex(block, h)];
          for (int c = 0; c < d; ++c) {
            mx[c] = int8_digest::Dequantize(q8[v.Offset(block, 0, h) + c], sc);
            mn[c] = int8_digest::Dequantize(q8[v.Offset(block, 1, h) + c], sc);
          }
        } else {
          const T* dmx = static_cast<const T*>(v.data) + v.Offset(block, 0, h);
          const T* dmn = static_cast<const T*>(v.data) + v.Offset(block, 1, h);
          for (int c = 0; c < d; ++c) {
            mx[c] = ToFloat(dmx[c]);
            mn[c] = ToFloat(dmn[c]);
          }
        }
        float a = 0.0f;
        for (int g = 0; g < groups; ++g) {
          const float v = PageBound(&q[static_cast<size_t>(g) * d], mx.data(), mn.data(), d);
          if (g == 0) {
            a = v;
          } else if (agg == GroupAggregation::kMax) {
            a = v > a ? v : a;
          } else {
            a += v;
          }
        }
        return a;
      };
      for (int h = h0; h < h1; ++h) {
        HierarchyStats& st = per_row[static_cast<size_t>(s) * cache.num_kv_heads + h];
        st.flat_page_rows = n;
        int32_t* row = out.Row(s, h);
        std::fill(row, row + out.max_selected, -1);
        if (n <= k) {
          for (int p = 0; p < n; ++p) row[p] = p;
          out.Count(s, h) = n;
          continue;
        }
        const int lo = config.num_sink_pages;
        const int hi = n - config.num_local_pages;  // middle pages [lo, hi)
        const int want = k - config.num_sink_pages - config.num_local_pages;
        int c = 0;
        for (int p = 0; p < lo; ++p) row[c++] = p;
        if (want > 0) {
          const size_t qrow0 = static_cast<size_t>(s) * query.num_heads + h * groups;
          for (size_t i = 0; i < q.size(); ++i) {
            q[i] = LoadAsFloat(query.data, query.dtype, qrow0 * d + i);
          }
          // Pass 1: super-pages holding a middle page.
          const int j0 = lo / f, j1 = (hi - 1) / f;  // inclusive
          cand.clear();
          cand_score.assign(static_cast<size_t>(j1 - j0 + 1), 0.0f);
          for (int j = j0; j <= j1; ++j) {
            const int sb = table.Block(s, j * f) / f;
            cand_score[j - j0] = NanLast(score(super, sb, h));
            cand.push_back(j);
          }
          st.super_rows_scored = static_cast<int64_t>(cand.size());
          std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) {
            const float ka = cand_score[a - j0], kb = cand_score[b - j0];
            return ka > kb || (ka == kb && a < b);
          });
          const int64_t min_kept =
              static_cast<int64_t>(config.hierarchy.expansion) * ((want + f - 1) / f);
          middle.clear();
          size_t kept = 0;
          while (kept < cand.size() && (static_cast<int64_t>(kept) < min_kept ||
                                        static_cast<int>(middle.size()) < want)) {
            const int j = cand[kept++];
            for (int p = std::max(j * f, lo); p < std::min(j * f + f, hi); ++p) middle.push_back(p);
          }
          st.kept_super_pages = static_cast<int64_t>(kept);
          // Pass 2: the kept super-pages' middle pages.
          page_score.assign(static_cast<size_t>(hi), 0.0f);
          for (int32_t p : middle) {
            const int b = table.Block(s, p);
            page_score[p] = NanLast(score(pages, b, h));
          }
          st.page_rows_scored = static_cast<int64_t>(middle.size());
          std::nth_element(middle.begin(), middle.begin() + want, middle.end(),
                           [&](int32_t a, int32_t b) {
                             const float ka = page_score[a], kb = page_score[b];
                             return ka > kb || (ka == kb && a < b);
                           });
          std::sort(middle.begin(), middle.begin() + want);
          for (int i = 0; i < want; ++i) row[c++] = middle[i];
        }
        for (int p = hi; p < n; ++p) row[c++] = p;
        out.Count(s, h) = c;
      }
    });
  });
  if (row_stats != nullptr) *row_stats = per_row;
  if (stats != nullptr) {
    *stats = HierarchyStats{};
    for (const HierarchyStats& st : per_row) {
      stats->super_rows_scored += st.super_rows_scored;
      stats->page_rows_scored += st.page_rows_scored;
      stats->flat_page_rows += st.flat_page_rows;
      stats->kept_super_pages += st.kept_super_pages;
    }
  }
  return absl::OkStatus();
}

}  // namespace mempipe
