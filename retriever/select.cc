#include "retriever/select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"
#include "core/cpu_kernel.h"
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

// The order SelectPages ranks scores by, as a signed integer: a larger score gets a larger key,
// NaN ranks as -inf, and -0 equals +0 (the float comparison's ties). Branch-free, so the loop
// that fills the keys vectorizes.
inline int32_t RankKey(float score) {
  int32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  constexpr int32_t kNegInf = static_cast<int32_t>(0xff800000u);
  constexpr int32_t kNegZero = static_cast<int32_t>(0x80000000u);
  bits = (bits & 0x7fffffff) > 0x7f800000 ? kNegInf : bits;  // NaN -> -inf
  bits = bits == kNegZero ? 0 : bits;                        // -0 -> +0
  return bits ^ ((bits >> 31) & 0x7fffffff);  // negatives: larger magnitude, smaller key
}

// How many of keys[0, n) are >= t. One pass of the threshold search below: the compiler
// vectorizes it, with AVX2 in the second copy (called only after the run-time check).
int CountAtLeast(const int32_t* keys, int n, int32_t t) {
  int c = 0;
  for (int i = 0; i < n; ++i) c += keys[i] >= t;
  return c;
}
#if MEMPIPE_AVX2_KERNEL
MEMPIPE_TARGET_AVX2 int CountAtLeastAvx2(const int32_t* keys, int n, int32_t t) {
  int c = 0;
  for (int i = 0; i < n; ++i) c += keys[i] >= t;
  return c;
}
#endif

// Where TopPagesAscending cuts: every key >= take_from is taken, and the first `ties` keys equal
// to `tie`.
struct Threshold {
  int64_t take_from = 0;
  int64_t tie = 0;
  int ties = 0;
};

// The want-th largest key t of keys in [mn, mx], 0 < want < their number, found by bisecting
// [mn, mx] on counts: count(t) is how many keys are >= t, and count(>= a) >= want holds for the
// lower end throughout. A threshold that leaves exactly `want` keys at or above it ends the
// search early.
template <typename Count>
inline Threshold FindThreshold(int32_t mn, int32_t mx, int want, Count count) {
  int64_t a = mn, b = mx;  // t lies in [a, b]
  Threshold t;
  for (;;) {
    if (a == b) {
      t.take_from = a + 1;
      t.ties = want - (a < mx ? count(static_cast<int32_t>(a + 1)) : 0);
      break;
    }
    const int64_t mid = a + (b - a + 1) / 2;
    const int c = count(static_cast<int32_t>(mid));
    if (c == want) {  // exactly the keys >= mid
      t.take_from = mid;
      break;
    }
    if (c > want) {
      a = mid;
    } else {
      b = mid - 1;
    }
  }
  t.tie = a;
  return t;
}

// Writes to `out`, ascending, the `want` pages of [lo, hi) with the highest scores, ties to the
// lower page index (0 < want < hi - lo); returns `want`. The want-th largest key is
// found by FindThreshold, each of its counts one vectorized pass over the keys; then one
// ascending pass takes every page above it and the first pages equal to it. `keys` is scratch.
int TopPagesAscending(const float* scores, int lo, int hi, int want, std::vector<int32_t>& keys,
                      int32_t* out) {
  const int n = hi - lo;
  keys.resize(n);
  int32_t* k = keys.data();
  int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
  for (int i = 0; i < n; ++i) {
    k[i] = RankKey(scores[lo + i]);
    mn = std::min(mn, k[i]);
    mx = std::max(mx, k[i]);
  }
  auto count = &CountAtLeast;
#if MEMPIPE_AVX2_KERNEL
  // (The avx512 kernels take TopPagesAscendingAvx512 instead of this function.)
  if (UseAvx2Kernel()) count = &CountAtLeastAvx2;
#endif
  const Threshold t = FindThreshold(mn, mx, want, [&](int32_t v) { return count(k, n, v); });
  int ties = t.ties;
  int c = 0;
  for (int i = 0; i < n && c < want; ++i) {
    if (k[i] >= t.take_from || (k[i] == t.tie && ties-- > 0)) out[c++] = lo + i;
  }
  return c;
}

#if MEMPIPE_AVX512_KERNEL
// TopPagesAscending in 16 lanes, the same search with the same result: RankKey per lane, each
// count one compare and one popcount per 16 keys, and the final pass a compress of the taken
// lanes' page numbers (in a register, then a masked store: compressing straight to memory is
// microcoded and slow on Zen 4). Past n the keys are INT32_MIN, below every RankKey (the
// smallest, -inf's, is 0x807fffff), so they are never counted or taken. Every CPU with
// AVX-512F has popcnt.
#define MEMPIPE_TARGET_AVX512_POPCNT __attribute__((target("avx512f,popcnt")))

MEMPIPE_TARGET_AVX512_POPCNT inline __m512i RankKeys16(__m512i bits) {
  const __m512i abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f800000));
  bits = _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(static_cast<int32_t>(0xff800000u)));
  const __mmask16 neg_zero =
      _mm512_cmpeq_epi32_mask(bits, _mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
  bits = _mm512_mask_mov_epi32(bits, neg_zero, _mm512_setzero_si512());
  return _mm512_xor_si512(
      bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7fffffff)));
}

MEMPIPE_TARGET_AVX512_POPCNT int CountAtLeastAvx512(const int32_t* keys, int vectors, int32_t t) {
  const __m512i tv = _mm512_set1_epi32(t);
  int c = 0;
  for (int j = 0; j < vectors; ++j) {
    c += _mm_popcnt_u32(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + 16 * j), tv));
  }
  return c;
}

MEMPIPE_TARGET_AVX512_POPCNT int TopPagesAscendingAvx512(const float* scores, int lo, int hi,
                                                         int want, std::vector<int32_t>& keys,
                                                         int32_t* out) {
  const int n = hi - lo;
  const int vectors = (n + 15) / 16;
  keys.resize(static_cast<size_t>(vectors) * 16);
  int32_t* k = keys.data();
  __m512i vmin = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  __m512i vmax = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  for (int j = 0; j < vectors; ++j) {
    const int left = n - 16 * j;
    const __mmask16 m = left >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << left) - 1);
    const __m512i key =
        _mm512_mask_mov_epi32(_mm512_set1_epi32(std::numeric_limits<int32_t>::min()), m,
                              RankKeys16(_mm512_maskz_loadu_epi32(m, scores + lo + 16 * j)));
    _mm512_storeu_si512(k + 16 * j, key);
    vmin = _mm512_mask_min_epi32(vmin, m, vmin, key);
    vmax = _mm512_max_epi32(vmax, key);
  }
  const int32_t mn = _mm512_reduce_min_epi32(vmin), mx = _mm512_reduce_max_epi32(vmax);
  const Threshold t =
      FindThreshold(mn, mx, want, [&](int32_t v) { return CountAtLeastAvx512(k, vectors, v); });
  int ties = t.ties;
  // take_from <= mx + 1 <= 0x7f800001 (+inf's key, plus one) fits an int32.
  const __m512i from = _mm512_set1_epi32(static_cast<int32_t>(t.take_from));
  const __m512i tie = _mm512_set1_epi32(static_cast<int32_t>(t.tie));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int c = 0;
  for (int j = 0; j < vectors && c < want; ++j) {
    const __m512i key = _mm512_loadu_si512(k + 16 * j);
    uint32_t m = _mm512_cmpge_epi32_mask(key, from);
    if (ties > 0) {  // the first `ties` keys equal to t.tie, in page order
      uint32_t eq = _mm512_cmpeq_epi32_mask(key, tie);
      for (; eq != 0 && ties > 0; --ties) {
        m |= eq & (0u - eq);
        eq &= eq - 1;
      }
    }
    const __m512i pages = _mm512_maskz_compress_epi32(
        static_cast<__mmask16>(m), _mm512_add_epi32(lane, _mm512_set1_epi32(lo + 16 * j)));
    const int taken = _mm_popcnt_u32(m);
    _mm512_mask_storeu_epi32(out + c, static_cast<__mmask16>((1u << taken) - 1), pages);
    c += taken;
  }
  return c;
}
#endif

// What SelectPages checks besides the scores: the config (flat), the selection's pointers and
// shape, and every seq_len inside [1, the table's width].
absl::Status ValidateSelectInputs(const BlockTableView& table, int block_size, int num_kv_heads,
                                  const SelectionConfig& config, const SelectionView& out) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(config, "SelectPages (one score per page)"));
  if (out.pages == nullptr || out.counts == nullptr) {
    return absl::InvalidArgumentError("selection pointers must not be null");
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
  return absl::OkStatus();
}

// Selects row (s, h) of `out` from that row's scores (`table.max_blocks_per_seq` of them, s's
// pages first). `keys` is scratch.
void SelectRow(const float* row_scores, const BlockTableView& table, int block_size,
               const SelectionConfig& config, const SelectionView& out, int s, int h,
               std::vector<int32_t>& keys) {
  const int k = config.PagesPerHead(block_size);
  const int n = NumPages(table.seq_lens[s], block_size);
  int32_t* row = out.Row(s, h);
  std::fill(row, row + out.max_selected, -1);
  if (n <= k) {
    std::iota(row, row + n, 0);
    out.Count(s, h) = n;
    return;
  }
  const int lo = config.num_sink_pages;
  const int hi = n - config.num_local_pages;  // middle pages are [lo, hi)
  const int want = k - config.num_sink_pages - config.num_local_pages;
  int c = 0;
  for (int p = 0; p < lo; ++p) row[c++] = p;
  if (want > 0) {  // the middle holds more than `want` pages: n > k
#if MEMPIPE_AVX512_KERNEL
    if (UseAvx512Kernel()) {
      c += TopPagesAscendingAvx512(row_scores, lo, hi, want, keys, row + c);
    } else {
      c += TopPagesAscending(row_scores, lo, hi, want, keys, row + c);
    }
#else
    c += TopPagesAscending(row_scores, lo, hi, want, keys, row + c);
#endif
  }
  for (int p = hi; p < n; ++p) row[c++] = p;
  out.Count(s, h) = c;
}

const float* RowScores(const float* scores, const BlockTableView& table, int num_kv_heads, int s,
                       int h) {
  return scores + (static_cast<size_t>(s) * num_kv_heads + h) * table.max_blocks_per_seq;
}

}  // namespace

absl::Status SelectPages(const float* scores, const BlockTableView& table, int block_size,
                         int num_kv_heads, const SelectionConfig& config, const SelectionView& out,
                         int num_threads) {
  if (scores == nullptr) return absl::InvalidArgumentError("scores pointer must not be null");
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectInputs(table, block_size, num_kv_heads, config, out));
  // Each (sequence, KV head) row is selected on its own: a range of them per thread, each
  // range with its own scratch.
  ForEachSeqHeads(table.num_seqs, num_kv_heads, num_threads, [&](int s, int h0, int h1) {
    std::vector<int32_t> keys;
    for (int h = h0; h < h1; ++h) {
      SelectRow(RowScores(scores, table, num_kv_heads, s, h), table, block_size, config, out, s, h,
                keys);
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
  return ScoreAndSelectThen(query, cache, digests, table, config, out, num_threads,
                            [](int64_t, int64_t) {});
}

absl::Status ScoreAndSelectThen(
    const QueryView& query, const KvCacheView& cache, const DigestView& digests,
    const BlockTableView& table, const SelectionConfig& config, const SelectionView& out,
    int num_threads, absl::FunctionRef<void(int64_t first, int64_t last)> rows_selected) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, cache.block_size));
  if (!config.hierarchy.Flat()) {
    MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
    const int f = config.hierarchy.pages_per_super_page;
    const SuperDigestBuffers super(digests, f);
    MEMPIPE_RETURN_IF_ERROR(BuildSuperDigests(digests, table, cache.block_size, f, super.view()));
    MEMPIPE_RETURN_IF_ERROR(
        SelectHierarchical(query, cache, digests, super.view(), table, config, out));
    rows_selected(0, static_cast<int64_t>(table.num_seqs) * cache.num_kv_heads);
    return absl::OkStatus();
  }
  MEMPIPE_RETURN_IF_ERROR(
      ValidateSelectInputs(table, cache.block_size, cache.num_kv_heads, config, out));
  // Each row is selected where its scan ends, in the same parallel call (ComputeRelevancyThen).
  std::vector<float> scores(static_cast<size_t>(table.num_seqs) * cache.num_kv_heads *
                            std::max(table.max_blocks_per_seq, 0));
  const int kvh = cache.num_kv_heads;
  return ComputeRelevancyThen(query, cache, digests, table, config.aggregation, scores.data(),
                              num_threads, [&](int64_t first, int64_t last) {
                                thread_local std::vector<int32_t> keys;
                                for (int64_t r = first; r < last; ++r) {
                                  const int s = static_cast<int>(r / kvh);
                                  const int h = static_cast<int>(r % kvh);
                                  SelectRow(RowScores(scores.data(), table, kvh, s, h), table,
                                            cache.block_size, config, out, s, h, keys);
                                }
                                rows_selected(first, last);
                              });
}

}  // namespace mempipe
