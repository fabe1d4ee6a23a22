#include "retriever/relevancy.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"
#include "core/cpu_kernel.h"
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
  const size_t i = FirstNonFinite(query.data, query.dtype, n);
  if (i < n) {
    const size_t row = i / query.head_dim;
    return absl::InvalidArgumentError(absl::StrCat(
        "query[", row / query.num_heads, "][", row % query.num_heads, "][", i % query.head_dim,
        "] is ", LoadAsFloat(query.data, query.dtype, i), "; queries must be finite"));
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

namespace {

// The portable scan: pages [p0, p1) of one (sequence, KV head) row, page by page, through
// PageBound.
//   q [groups, d] fp32; out [>= p1] the row's scores
template <typename T>
void PortableScoreRow(const float* q, int groups, int d, const DigestView& digests,
                      const BlockTableView& table, int s, int h, int p0, int p1,
                      GroupAggregation agg, float* out) {
  std::vector<float> mx(d), mn(d);
  const T* dg = static_cast<const T*>(digests.data);
  for (int p = p0; p < p1; ++p) {
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
}

// How far ahead of the pages being scored the vector scans prefetch a head's digest rows: each
// row a fixed distance ahead as its page is reached, into L2 (_MM_HINT_T1). Into L1 (T0) the
// prefetches did worse than none at all: on the Zen 4 build VM, one thread, bf16 digests from
// DRAM, a Llama-3-8B layer of 32K tokens (8 MiB of digests) took 1.09 ms with T0 at 8-64 pages
// ahead, 0.88 ms with no prefetch and 0.74-0.77 ms with T1 at 4-64 pages ahead; SmolLM2's
// 4 x 6K layer (576 KiB) 78-89 us, 85 us and 57-65 us.
// The prefetches are spread over the arithmetic: a page's are issued just before its sums, not
// a batch's at once before the batch's sums. A burst of 64 (16 pages, 4 lines) waits on the
// core's few line-fill buffers while no arithmetic runs. On an Emerald Rapids VM, one thread,
// SmolLM2's layer took 64-69 us spread against 74-78 us in bursts (bf16; fp32 94 against 120),
// with the hardware prefetchers alone 88-95 us; distances of 8 and 24 pages were no better than
// 16 (integration/bench/results/scan_spread/).
[[maybe_unused]] constexpr int kAhead = 16;

#if MEMPIPE_AVX512_KERNEL || MEMPIPE_AVX2_KERNEL
// KV head h's digest rows (max, min) of page `page` of sequence s, and its block (the vector
// scans' walk); amx, amn: the same head's rows kAhead pages ahead, or null where that page is
// not below p1.
template <typename Src>
inline int PageDigestRows(const DigestView& digests, const BlockTableView& table, int s, int h,
                          int page, int p1, const Src*& mx, const Src*& mn, const char*& amx,
                          const char*& amn) {
  const Src* data = static_cast<const Src*>(digests.data);
  const int block = table.Block(s, page);
  mx = data + digests.Offset(block, 0, h);
  mn = data + digests.Offset(block, 1, h);
  amx = amn = nullptr;
  if (page + kAhead < p1) {
    const int ahead = table.Block(s, page + kAhead);
    amx = reinterpret_cast<const char*>(data + digests.Offset(ahead, 0, h));
    amn = reinterpret_cast<const char*>(data + digests.Offset(ahead, 1, h));
  }
  return block;
}

// Both rows at amx and amn, `row_bytes` each, into L2 (nothing where amx is null). Always
// inlined: GCC 12 finds a function that only prefetches free of side effects and, at -O2 and
// above, deletes its calls (IPA pure-const), prefetches and all.
__attribute__((always_inline)) inline void PrefetchRows(const char* amx, const char* amn,
                                                        int row_bytes) {
  if (amx == nullptr) return;
  for (int off = 0; off < row_bytes; off += 64) {
    _mm_prefetch(amx + off, _MM_HINT_T1);
    _mm_prefetch(amn + off, _MM_HINT_T1);
  }
}

#endif

#if MEMPIPE_AVX512_KERNEL
// ---- AVX-512 scan -------------------------------------------------------------------------
// The canonical order (relevancy.h), 16 pages at a time. Per query head and page, two vectors
// hold the 32 lanes (lanes 0-15: channels c % 32 < 16; lanes 16-31: the rest); each lane adds
// its max(q*mx, q*mn) terms in increasing channel order with separate multiplies (no FMA:
// the library is built with -ffp-contract=off and the intrinsics are explicit), exactly as
// PageBound. The first tree level (lane i += lane i + 16) is the sum of the two vectors; the
// remaining four levels (8, 4, 2, 1) run for 16 pages at once as a transposing reduction
// (Reduce16), which leaves page i's score in lane i. Max and sum over the group are then
// vector ops in increasing head order. Each page's digest rows are widened into registers once
// for up to kScanGroups query heads of the group, which share them. Digest elements are widened
// exactly: fp32 as is, fp16 by vcvtph2ps, bf16 by a zero-extending shift (channel order kept), int8
// by fl(float(q) * scale), int8_digest::Dequantize.

// 16 digest channels as fp32, channel order kept. `scale` is used by int8 only.
[[maybe_unused]] MEMPIPE_TARGET_AVX512 inline __m512 LoadRow16(const float* p, __m512) {
  return _mm512_loadu_ps(p);
}
MEMPIPE_TARGET_AVX512 inline __m512 LoadRow16(const Half* p, __m512) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MEMPIPE_TARGET_AVX512 inline __m512 LoadRow16(const BFloat16* p, __m512) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
MEMPIPE_TARGET_AVX512 inline __m512 LoadRow16(const int8_t* p, __m512 scale) {
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(w), scale);
}

// Tree levels 8, 4, 2, 1 of 16 pages' 16-lane vectors x[i] (level 16 already applied): each
// level adds lane j and lane j + s of every page, pairs of pages sharing one add.
MEMPIPE_TARGET_AVX512 inline __m512 Reduce16(const float (*x)[16]) {
  __m512 t[8], u[4], v[2];
  for (int k = 0; k < 8; ++k) {  // s = 8: t[k] lanes 0-7 page 2k, lanes 8-15 page 2k + 1
    const __m512 a = _mm512_load_ps(x[2 * k]), b = _mm512_load_ps(x[2 * k + 1]);
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int m = 0; m < 4; ++m) {  // s = 4: u[m] 128-bit block i holds page 4m + i
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int n = 0; n < 2; ++n) {  // s = 2: v[n] block i: lanes 0-1 page 8n + i, 2-3 page 8n+4+i
    v[n] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * n], u[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * n], u[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // s = 1: lane 4i + j holds page 4j + i; the permutation puts page p in lane p.
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(idx, w);
}

// Pages scored together (one Reduce16), and the query heads of a GQA group scored together over
// a page's digest rows, widened once into registers for all of them.
constexpr int kScanBatch = 16;
constexpr int kScanGroups = 4;

// Tree level 16 of pages [0, np) for GB query heads: x[g][i] = lo + hi, where lane l of lo adds
// max(q*mx, q*mn) of channels 32c + l and lane l of hi of channels 32c + 16 + l, in increasing
// c. The query rows stay in registers over the pages; each page's digest rows are widened in
// registers (LoadRow16) and shared by the GB heads.
//   q [GB, ND * 32] fp32
template <typename Src, int ND, int GB>
MEMPIPE_TARGET_AVX512 inline void Avx512PageSums(const float* q, const Src* const* mx,
                                                 const Src* const* mn, const __m512* scale, int np,
                                                 const char* const* ahead,
                                                 float (*x)[kScanBatch][16]) {
  constexpr int kD = ND * 32;
  __m512 qv[GB][2 * ND];
  for (int g = 0; g < GB; ++g) {
    for (int j = 0; j < 2 * ND; ++j) qv[g][j] = _mm512_loadu_ps(q + g * kD + 16 * j);
  }
  for (int i = 0; i < np; ++i) {
    if (ahead != nullptr) PrefetchRows(ahead[2 * i], ahead[2 * i + 1], kD * sizeof(Src));
    __m512 lo[GB], hi[GB];
    for (int g = 0; g < GB; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int c = 0; c < ND; ++c) {
      const __m512 xl = LoadRow16(mx[i] + 32 * c, scale[i]);
      const __m512 xh = LoadRow16(mx[i] + 32 * c + 16, scale[i]);
      const __m512 nl = LoadRow16(mn[i] + 32 * c, scale[i]);
      const __m512 nh = LoadRow16(mn[i] + 32 * c + 16, scale[i]);
      for (int g = 0; g < GB; ++g) {
        const __m512 ql = qv[g][2 * c], qh = qv[g][2 * c + 1];
        lo[g] = _mm512_add_ps(lo[g], _mm512_max_ps(_mm512_mul_ps(ql, xl), _mm512_mul_ps(ql, nl)));
        hi[g] = _mm512_add_ps(hi[g], _mm512_max_ps(_mm512_mul_ps(qh, xh), _mm512_mul_ps(qh, nh)));
      }
    }
    for (int g = 0; g < GB; ++g) _mm512_store_ps(x[g][i], _mm512_add_ps(lo[g], hi[g]));
  }
}

// The scores of pages [p0, p1) of KV heads [h0, h1) of sequence s, 16 pages at a time for all of
// those heads (their rows of a block lie together, so the scan walks the digests nearly in address
// order and each 4 KiB page of them is entered once per batch, not once per head). Each page's
// rows are widened in registers once per kScanGroups query heads (Avx512PageSums), with no copy
// through memory; Reduce16 then finishes 16 pages of a head at once, and the group's heads
// aggregate in increasing order.
//   q [h1 - h0, groups, ND * 32] fp32; out(h) -> [>= p1] the scores of head h
template <typename Src, int ND, typename Out>
MEMPIPE_TARGET_AVX512 void Avx512ScoreHeads(const float* q, int groups, const DigestView& digests,
                                            const BlockTableView& table, int s, int h0, int h1,
                                            int p0, int p1, GroupAggregation agg, Out out) {
  constexpr int kD = ND * 32;
  const bool int8 = digests.format == DigestFormat::kInt8;
  const Src* mx[kScanBatch];
  const Src* mn[kScanBatch];
  __m512 scale[kScanBatch];
  alignas(64) float x[kScanGroups][kScanBatch][16];
  const char* ahead[2 * kScanBatch];  // the rows kAhead pages ahead of each page, max and min
  for (int b0 = p0; b0 < p1; b0 += kScanBatch) {
    const int np = std::min(kScanBatch, p1 - b0);
    if (np < kScanBatch) {  // Reduce16 reads all 16 pages; the missing ones are not stored
      for (int g = 0; g < kScanGroups; ++g) {
        for (int i = np; i < kScanBatch; ++i) _mm512_store_ps(x[g][i], _mm512_setzero_ps());
      }
    }
    for (int h = h0; h < h1; ++h) {
      for (int i = 0; i < np; ++i) {
        const int block = PageDigestRows(digests, table, s, h, b0 + i, p1, mx[i], mn[i],
                                         ahead[2 * i], ahead[2 * i + 1]);
        scale[i] = _mm512_set1_ps(int8 ? digests.scales[digests.ScaleIndex(block, h)] : 1.0f);
      }
      const float* qh = q + static_cast<size_t>(h - h0) * groups * kD;
      __m512 agg_score = _mm512_setzero_ps();
      for (int g0 = 0; g0 < groups; g0 += kScanGroups) {
        const int gb = std::min(kScanGroups, groups - g0);
        const float* qg = qh + static_cast<size_t>(g0) * kD;
        const char* const* pf = g0 == 0 ? ahead : nullptr;  // once per page and head
        switch (gb) {
          case 1:
            Avx512PageSums<Src, ND, 1>(qg, mx, mn, scale, np, pf, x);
            break;
          case 2:
            Avx512PageSums<Src, ND, 2>(qg, mx, mn, scale, np, pf, x);
            break;
          case 3:
            Avx512PageSums<Src, ND, 3>(qg, mx, mn, scale, np, pf, x);
            break;
          default:
            Avx512PageSums<Src, ND, kScanGroups>(qg, mx, mn, scale, np, pf, x);
            break;
        }
        for (int g = 0; g < gb; ++g) {
          const __m512 v = Reduce16(x[g]);
          // max: v > agg ? v : agg, which is vmaxps(v, agg); sum: agg + v.
          agg_score = g0 + g == 0                     ? v
                      : agg == GroupAggregation::kMax ? _mm512_max_ps(v, agg_score)
                                                      : _mm512_add_ps(agg_score, v);
        }
      }
      _mm512_mask_storeu_ps(out(h) + b0, static_cast<__mmask16>((1u << np) - 1), agg_score);
    }
  }
}

template <typename Src, typename Out>
MEMPIPE_TARGET_AVX512 void Avx512ScoreHeadsAnyDim(const float* q, int groups, int d,
                                                  const DigestView& digests,
                                                  const BlockTableView& table, int s, int h0,
                                                  int h1, int p0, int p1, GroupAggregation agg,
                                                  Out out) {
  switch (d) {
    case 64:
      return Avx512ScoreHeads<Src, 2>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
    case 128:
      return Avx512ScoreHeads<Src, 4>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
    default:  // 256 (ValidateKvCache admits 64, 128, 256)
      return Avx512ScoreHeads<Src, 8>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
  }
}
#endif  // MEMPIPE_AVX512_KERNEL

#if MEMPIPE_AVX2_KERNEL
// ---- AVX2 scan ----------------------------------------------------------------------------
// The AVX-512 scan at eight lanes, in the same canonical order: per query head and page, four
// vectors hold the 32 lanes (channels c % 32 in [0, 8), [8, 16), [16, 24), [24, 32)), each
// lane adding its max(q*mx, q*mn) terms in increasing channel order with separate multiplies;
// tree levels 16 and 8 are sums of those vectors, and levels 4, 2, 1 run for 8 pages at once as
// a transposing reduction (Reduce8), which leaves page i's score in lane i. Widening as the
// AVX-512 scan's.

// 8 digest channels as fp32, channel order kept. `scale` is used by int8 only.
[[maybe_unused]] MEMPIPE_TARGET_AVX2 inline __m256 LoadRow8(const float* p, __m256) {
  return _mm256_loadu_ps(p);
}
MEMPIPE_TARGET_AVX2 inline __m256 LoadRow8(const Half* p, __m256) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MEMPIPE_TARGET_AVX2 inline __m256 LoadRow8(const BFloat16* p, __m256) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
MEMPIPE_TARGET_AVX2 inline __m256 LoadRow8(const int8_t* p, __m256 scale) {
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(w), scale);
}

// Tree levels 4, 2, 1 of 8 pages' 8-lane vectors x[i] (levels 16 and 8 already applied).
MEMPIPE_TARGET_AVX2 inline __m256 Reduce8(const float (*x)[8]) {
  __m256 t[4], u[2];
  for (int k = 0; k < 4; ++k) {  // s = 4: t[k] lanes 0-3 page 2k, lanes 4-7 page 2k + 1
    const __m256 a = _mm256_load_ps(x[2 * k]), b = _mm256_load_ps(x[2 * k + 1]);
    t[k] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int m = 0; m < 2; ++m) {  // s = 2: u[m] low half pages 4m, 4m + 2; high 4m + 1, 4m + 3
    u[m] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // s = 1: the low half holds pages 0, 2, 4, 6 and the high half 1, 3, 5, 7.
  const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

constexpr int kScanBatch2 = 8;

// Scores of `np` <= 8 pages for one KV head from their fp32 rows mx[i], mn[i]; ND =
// head_dim / 32.
//   q [groups, ND * 32] fp32; out [np]
template <int ND>
MEMPIPE_TARGET_AVX2 void Avx2ScoreBatch(const float* q, int groups, const float* const* mx,
                                        const float* const* mn, int np, const char* const* ahead,
                                        int row_bytes, GroupAggregation agg, float* out) {
  constexpr int kD = ND * 32;
  alignas(32) float x[kScanBatch2][8];
  for (int i = np; i < kScanBatch2; ++i) _mm256_store_ps(x[i], _mm256_setzero_ps());
  __m256 agg_score = _mm256_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    const float* qg = q + static_cast<size_t>(g) * kD;
    for (int i = 0; i < np; ++i) {
      if (g == 0) PrefetchRows(ahead[2 * i], ahead[2 * i + 1], row_bytes);
      __m256 v[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
      for (int c = 0; c < ND; ++c) {
        for (int k = 0; k < 4; ++k) {
          const __m256 qk = _mm256_loadu_ps(qg + 32 * c + 8 * k);
          v[k] = _mm256_add_ps(
              v[k], _mm256_max_ps(_mm256_mul_ps(qk, _mm256_loadu_ps(mx[i] + 32 * c + 8 * k)),
                                  _mm256_mul_ps(qk, _mm256_loadu_ps(mn[i] + 32 * c + 8 * k))));
        }
      }
      // Levels 16 and 8: lane i += lane i + 16, then lane i += lane i + 8.
      _mm256_store_ps(x[i], _mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3])));
    }
    const __m256 v = Reduce8(x);
    agg_score = g == 0                          ? v
                : agg == GroupAggregation::kMax ? _mm256_max_ps(v, agg_score)
                                                : _mm256_add_ps(agg_score, v);
  }
  alignas(32) float res[8];
  _mm256_store_ps(res, agg_score);
  std::copy(res, res + np, out);
}

// Avx512ScoreHeads at eight pages a batch.
template <typename Src, int ND, typename Out>
MEMPIPE_TARGET_AVX2 void Avx2ScoreHeads(const float* q, int groups, const DigestView& digests,
                                        const BlockTableView& table, int s, int h0, int h1, int p0,
                                        int p1, GroupAggregation agg, Out out) {
  constexpr int kD = ND * 32;
  const bool int8 = digests.format == DigestFormat::kInt8;
  const float* mx[kScanBatch2];
  const float* mn[kScanBatch2];
  alignas(32) float wide[std::is_same_v<Src, float> ? 1 : kScanBatch2 * 2 * kD];
  const char* ahead[2 * kScanBatch2];  // the rows kAhead pages ahead of each page, max and min
  for (int b0 = p0; b0 < p1; b0 += kScanBatch2) {
    const int np = std::min(kScanBatch2, p1 - b0);
    for (int h = h0; h < h1; ++h) {
      for (int i = 0; i < np; ++i) {
        const Src* rmx;
        const Src* rmn;
        const int block = PageDigestRows(digests, table, s, h, b0 + i, p1, rmx, rmn, ahead[2 * i],
                                         ahead[2 * i + 1]);
        if constexpr (std::is_same_v<Src, float>) {
          mx[i] = rmx;
          mn[i] = rmn;
        } else {
          const __m256 scale =
              _mm256_set1_ps(int8 ? digests.scales[digests.ScaleIndex(block, h)] : 1.0f);
          float* w = wide + static_cast<size_t>(i) * 2 * kD;
          for (int c = 0; c < kD; c += 8) {
            _mm256_store_ps(w + c, LoadRow8(rmx + c, scale));
            _mm256_store_ps(w + kD + c, LoadRow8(rmn + c, scale));
          }
          mx[i] = w;
          mn[i] = w + kD;
        }
      }
      Avx2ScoreBatch<ND>(q + static_cast<size_t>(h - h0) * groups * kD, groups, mx, mn, np, ahead,
                         kD * static_cast<int>(sizeof(Src)), agg, out(h) + b0);
    }
  }
}

template <typename Src, typename Out>
MEMPIPE_TARGET_AVX2 void Avx2ScoreHeadsAnyDim(const float* q, int groups, int d,
                                              const DigestView& digests,
                                              const BlockTableView& table, int s, int h0, int h1,
                                              int p0, int p1, GroupAggregation agg, Out out) {
  switch (d) {
    case 64:
      return Avx2ScoreHeads<Src, 2>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
    case 128:
      return Avx2ScoreHeads<Src, 4>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
    default:  // 256 (ValidateKvCache admits 64, 128, 256)
      return Avx2ScoreHeads<Src, 8>(q, groups, digests, table, s, h0, h1, p0, p1, agg, out);
  }
}
#endif  // MEMPIPE_AVX2_KERNEL

}  // namespace

absl::Status ComputeRelevancy(const QueryView& query, const KvCacheView& cache,
                              const DigestView& digests, const BlockTableView& table,
                              GroupAggregation agg, float* scores, int num_threads) {
  return ComputeRelevancyThen(query, cache, digests, table, agg, scores, num_threads,
                              [](int64_t, int64_t) {});
}

absl::Status ComputeRelevancyThen(const QueryView& query, const KvCacheView& cache,
                                  const DigestView& digests, const BlockTableView& table,
                                  GroupAggregation agg, float* scores, int num_threads,
                                  absl::FunctionRef<void(int64_t first, int64_t last)> rows_done) {
  MEMPIPE_RETURN_IF_ERROR(ValidateGroupAggregation(agg));
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(query, cache, table));
  if (scores == nullptr) return absl::InvalidArgumentError("scores pointer is null");

  const int d = cache.head_dim;
  const int groups = query.num_heads / cache.num_kv_heads;
  const bool avx512 = UseAvx512Kernel(), avx2 = UseAvx2Kernel();
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
    // Pages [p0, p1) of the rows of KV heads [h0, h1) of sequence s, and the -inf tail past the
    // sequence's pages inside [p0, p1).
    auto score = [&](int s, int h0, int h1, int p0, int p1) {
      // The query rows of heads [h0, h1), fp32: [h1 - h0, groups, d].
      const size_t gd = static_cast<size_t>(groups) * d;
      std::vector<float> q((h1 - h0) * gd);
      const size_t qrow0 = static_cast<size_t>(s) * query.num_heads + h0 * groups;
      for (size_t i = 0; i < q.size(); ++i) {
        q[i] = LoadAsFloat(query.data, query.dtype, qrow0 * d + i);
      }
      const int pages = NumPages(table.seq_lens[s], cache.block_size);
      const int end = std::min(p1, pages);
      auto out = [&](int h) {
        return scores + (static_cast<size_t>(s) * kvh + h) * table.max_blocks_per_seq;
      };
#if MEMPIPE_AVX512_KERNEL
      if (avx512 && p0 < end) {
        if (digests.format == DigestFormat::kInt8) {
          Avx512ScoreHeadsAnyDim<int8_t>(q.data(), groups, d, digests, table, s, h0, h1, p0, end,
                                         agg, out);
        } else {
          Avx512ScoreHeadsAnyDim<T>(q.data(), groups, d, digests, table, s, h0, h1, p0, end, agg,
                                    out);
        }
      }
#endif
#if MEMPIPE_AVX2_KERNEL
      if (avx2 && p0 < end) {
        if (digests.format == DigestFormat::kInt8) {
          Avx2ScoreHeadsAnyDim<int8_t>(q.data(), groups, d, digests, table, s, h0, h1, p0, end, agg,
                                       out);
        } else {
          Avx2ScoreHeadsAnyDim<T>(q.data(), groups, d, digests, table, s, h0, h1, p0, end, agg,
                                  out);
        }
      }
#endif
      for (int h = h0; h < h1; ++h) {
        if (!avx512 && !avx2) {
          PortableScoreRow<T>(&q[(h - h0) * gd], groups, d, digests, table, s, h, p0, end, agg,
                              out(h));
        }
        for (int p = std::max(p0, pages); p < p1; ++p) {
          out(h)[p] = -std::numeric_limits<float>::infinity();
        }
      }
    };
    if (chunks == 1) {  // a contiguous range of rows per thread (ForEachSeqHeads' split)
      ForEachItemRange(rows, num_threads, [&](int64_t begin, int64_t end) {
        ForSeqHeadsIn(begin, end, kvh, [&](int s, int h0, int h1) {
          score(s, h0, h1, 0, table.max_blocks_per_seq);
        });
        rows_done(begin, end);
      });
      return;
    }
    // The last of a row's chunks to finish reports it (acq_rel: it sees the others' scores).
    std::unique_ptr<std::atomic<int>[]> pending(new std::atomic<int>[rows]);
    for (int64_t r = 0; r < rows; ++r) pending[r].store(static_cast<int>(chunks));
    const int64_t tasks = rows * chunks;
    HostParallelFor(static_cast<int>(tasks), static_cast<int>(std::min(threads, tasks)),
                    [&](int t) {
                      const int64_t row = t / chunks, c = t % chunks;
                      const int64_t width = table.max_blocks_per_seq;
                      const int h = static_cast<int>(row % kvh);
                      const int s = static_cast<int>(row / kvh);
                      score(s, h, h + 1, static_cast<int>(width * c / chunks),
                            static_cast<int>(width * (c + 1) / chunks));
                      if (pending[row].fetch_sub(1, std::memory_order_acq_rel) == 1) {
                        rows_done(row, row + 1);
                      }
                    });
  });
  return absl::OkStatus();
}

}  // namespace mempipe
