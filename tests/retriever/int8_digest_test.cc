// Int8 digests (retriever/int8_quant.h, digest.h kInt8): the bound holds exactly in fp32 on
// adversarial and random values, a wrong quantizer is caught, the incremental update equals the
// bulk build bit for bit and keeps the bound after every token, and scoring/selection run on the
// dequantized bound.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/int8_quant.h"
#include "retriever/page_selector.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"
#include "tests/testing/int8_digests.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::Int8Digests;
using testing::PagedFixture;
using testing::TestSeed;
namespace q8 = int8_digest;

using Quantizer = std::function<float(const float*, const float*, int, int8_t*, int8_t*)>;

// Violations of the bound contract for one (page, head): codes outside [-127, 127],
// fl(qmax * s) < max_c or fl(qmin * s) > min_c. Returns the count (0 = valid).
int BoundViolations(const float* mx, const float* mn, int d, const int8_t* qmx, const int8_t* qmn,
                    float s) {
  int bad = 0;
  for (int c = 0; c < d; ++c) {
    if (qmx[c] < -127 || qmn[c] < -127) ++bad;
    if (!(q8::Dequantize(qmx[c], s) >= mx[c])) ++bad;
    if (!(q8::Dequantize(qmn[c], s) <= mn[c])) ++bad;
  }
  return bad;
}

// Adversarial rows: each case is (max row, min row) of 8 channels.
std::vector<std::pair<std::vector<float>, std::vector<float>>> AdversarialRows() {
  const float kMax = std::numeric_limits<float>::max();
  const float kDen = std::numeric_limits<float>::denorm_min();
  const float kTiny = std::numeric_limits<float>::min();
  std::vector<std::pair<std::vector<float>, std::vector<float>>> rows;
  rows.push_back({std::vector<float>(8, 0.0f), std::vector<float>(8, 0.0f)});    // zero page
  rows.push_back({std::vector<float>(8, -0.0f), std::vector<float>(8, -0.0f)});  // -0 page
  rows.push_back({{kDen, 0, -kDen, kDen, 0, 0, 0, kDen}, {0, -kDen, -kDen, 0, 0, -kDen, 0, 0}});
  rows.push_back({{3 * kDen, kDen, 200 * kDen, kTiny, kTiny / 3, 0, 1e-40f, 5e-45f},
                  {-kDen, -7 * kDen, 100 * kDen, -kTiny, -kTiny / 7, -1e-41f, -1e-40f, 0}});
  rows.push_back({{kMax, kMax, 0, 1, -1, kMax / 2, 1e38f, -kMax},
                  {-kMax, 0, -kMax, -1, -2, -kMax / 3, -1e38f, -kMax}});
  // A channel exactly at the scale, one at 127 x scale, one at -127 x scale, and neighbours.
  const float s = q8::Scale(127.0f * 0.75f, true);  // 0.75 exactly
  rows.push_back(
      {{127 * s, s, std::nextafter(s, 0.0f), std::nextafter(s, 1.0f), 2 * s, 0, -s, -126 * s},
       {-127 * s, -s, std::nextafter(-s, 0.0f), std::nextafter(-s, -1.0f), s, 0, -2 * s,
        -127 * s}});
  // Magnitudes whose m / 127 rounds down (the scale then needs its one-ulp step up).
  for (float m : {1.0f, 3.0f, 100.0f, 0.1f, 1e-30f, 7.0e33f}) {
    for (int i = 0; i < 4; ++i) {
      const float v = std::nextafter(m, 2 * m);
      m = v;
      rows.push_back({{m, m / 3, -m / 5, m / 127, m / 126, m / 2, 0, 0},
                      {-m, -m / 3, -m / 5, -m / 127, -m / 128, -m, 0, 0}});
    }
  }
  return rows;
}

TEST(Int8Quant, BoundHoldsOnAdversarialValues) {
  for (const auto& [mx, mn] : AdversarialRows()) {
    std::vector<int8_t> qmx(8), qmn(8);
    const float s = q8::QuantizeRows(mx.data(), mn.data(), 8, qmx.data(), qmn.data());
    float m = 0;
    for (int c = 0; c < 8; ++c) m = std::max({m, std::abs(mx[c]), std::abs(mn[c])});
    EXPECT_GE(127.0f * s, m) << "scale " << s << " for magnitude " << m;
    EXPECT_EQ(BoundViolations(mx.data(), mn.data(), 8, qmx.data(), qmn.data(), s), 0)
        << "m " << m << " s " << s;
    if (m == 0) {
      EXPECT_EQ(s, 0.0f);
      for (int c = 0; c < 8; ++c) EXPECT_EQ(qmx[c] | qmn[c], 0);
    }
  }
}

// Random rows across the whole exponent range (subnormal to near-max), plus the tightness of
// the codes: one code lower than chosen would be at most one step past the bound (never two).
TEST(Int8Quant, BoundHoldsAndIsTightOnRandomValues) {
  std::mt19937_64 rng(TestSeed());
  std::uniform_int_distribution<uint32_t> bits(0, 0x7f7fffffu);  // finite non-negative floats
  std::uniform_int_distribution<int> mode(0, 3);
  std::normal_distribution<float> normal;
  constexpr int d = 64;
  float mx[d], mn[d];
  int8_t qmx[d], qmn[d];
  for (int it = 0; it < 20000; ++it) {
    const int md = mode(rng);
    const float base = q8::FromBits(bits(rng));
    for (int c = 0; c < d; ++c) {
      float a, b;
      if (md == 0) {  // any finite values
        a = q8::FromBits(bits(rng)) * (normal(rng) < 0 ? -1.0f : 1.0f);
        b = q8::FromBits(bits(rng)) * (normal(rng) < 0 ? -1.0f : 1.0f);
      } else {  // one magnitude scale, as real pages are
        a = base * normal(rng);
        b = base * normal(rng);
      }
      mx[c] = std::max(a, b);
      mn[c] = std::min(a, b);
    }
    const float s = q8::QuantizeRows(mx, mn, d, qmx, qmn);
    ASSERT_EQ(BoundViolations(mx, mn, d, qmx, qmn, s), 0) << "iteration " << it;
    if (!q8::IsFinite(s)) continue;  // an overflowed page: [-inf, inf], nothing to tighten
    for (int c = 0; c < d; ++c) {
      if (qmx[c] >= -125) {
        ASSERT_LT(q8::Dequantize(qmx[c] - 2, s), mx[c]) << it << " c " << c;
      }
      if (qmn[c] <= 125) {
        ASSERT_GT(q8::Dequantize(qmn[c] + 2, s), mn[c]) << it << " c " << c;
      }
    }
  }
}

// The check above is not vacuous: quantizers that round the wrong way, or skip the scale's
// correction, are caught on the same kind of data.
TEST(Int8Quant, BoundCheckRejectsWrongQuantizers) {
  const Quantizer round_max_down = [](const float* mx, const float* mn, int d, int8_t* qmx,
                                      int8_t* qmn) {
    float m = 0;
    bool fin = true;
    for (int c = 0; c < d; ++c) q8::FoldMagnitude(mx[c], mn[c], m, fin);
    const float s = q8::Scale(m, fin);
    for (int c = 0; c < d; ++c) {
      qmx[c] = static_cast<int8_t>(std::floor(mx[c] / s));
      qmn[c] = q8::QuantizeDown(mn[c], s);
    }
    return s;
  };
  const Quantizer nearest = [](const float* mx, const float* mn, int d, int8_t* qmx, int8_t* qmn) {
    float m = 0;
    bool fin = true;
    for (int c = 0; c < d; ++c) q8::FoldMagnitude(mx[c], mn[c], m, fin);
    const float s = q8::Scale(m, fin);
    for (int c = 0; c < d; ++c) {
      qmx[c] = static_cast<int8_t>(std::nearbyint(mx[c] / s));
      qmn[c] = static_cast<int8_t>(std::nearbyint(mn[c] / s));
    }
    return s;
  };
  // Scale without the step up, codes clamped to 127 only by the division.
  const Quantizer no_scale_step = [](const float* mx, const float* mn, int d, int8_t* qmx,
                                     int8_t* qmn) {
    float m = 0;
    bool fin = true;
    for (int c = 0; c < d; ++c) q8::FoldMagnitude(mx[c], mn[c], m, fin);
    const float s = m / 127.0f;
    for (int c = 0; c < d; ++c) {
      qmx[c] = static_cast<int8_t>(std::min(127.0f, std::ceil(mx[c] / s)));
      qmn[c] = static_cast<int8_t>(std::max(-127.0f, std::floor(mn[c] / s)));
    }
    return s;
  };
  std::mt19937_64 rng(TestSeed());
  std::normal_distribution<float> normal;
  for (const auto& [name, quant] :
       {std::pair{"round max down", round_max_down}, std::pair{"round to nearest", nearest},
        std::pair{"no scale step", no_scale_step}}) {
    int bad = 0;
    for (const auto& [mx, mn] : AdversarialRows()) {
      std::vector<int8_t> qmx(8), qmn(8);
      const float s = quant(mx.data(), mn.data(), 8, qmx.data(), qmn.data());
      if (s > 0) bad += BoundViolations(mx.data(), mn.data(), 8, qmx.data(), qmn.data(), s);
    }
    float mx[64], mn[64];
    int8_t qmx[64], qmn[64];
    for (int it = 0; it < 200; ++it) {
      for (int c = 0; c < 64; ++c) {
        const float a = normal(rng), b = normal(rng);
        mx[c] = std::max(a, b);
        mn[c] = std::min(a, b);
      }
      const float s = quant(mx, mn, 64, qmx, qmn);
      bad += BoundViolations(mx, mn, 64, qmx, qmn, s);
    }
    EXPECT_GT(bad, 0) << name << " passed the bound check";
  }
}

TEST(Int8Quant, NonFiniteChannelsGiveAnUnboundedPage) {
  const float inf = std::numeric_limits<float>::infinity();
  float mx[4] = {1, inf, 0, 2}, mn[4] = {-1, 0, std::nanf(""), 1};
  int8_t qmx[4], qmn[4];
  const float s = q8::QuantizeRows(mx, mn, 4, qmx, qmn);
  EXPECT_EQ(s, inf);
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(q8::Dequantize(qmx[c], s), inf);
    EXPECT_EQ(q8::Dequantize(qmn[c], s), -inf);
  }
}

class Int8DigestTest : public ::testing::TestWithParam<std::tuple<DType, int, int>> {};

// Bulk build: codes and scale equal QuantizeRows of the native build's rows, and the bound
// contains every key of the page. Incremental (token by token, sequences interleaved, through
// the fused append and through UpdateDigestsFromKeys): the same bytes as the bulk build, and
// after every step the bound contains every key appended so far.
TEST_P(Int8DigestTest, BulkMatchesReferenceAndIncrementalMatchesBulk) {
  const auto [dtype, block_size, head_dim] = GetParam();
  std::mt19937_64 rng(TestSeed());
  std::uniform_int_distribution<int> len_dist(1, 4 * block_size + 3);
  std::vector<int> lens = {1, block_size, block_size + 1, len_dist(rng), len_dist(rng)};
  constexpr int kHeads = 3;
  PagedFixture f(rng, {.dtype = dtype,
                       .block_size = block_size,
                       .num_kv_heads = kHeads,
                       .head_dim = head_dim,
                       .seq_lens = lens});
  const DigestView native = f.digest_view();
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), native).ok());
  Int8Digests bulk(native);
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), bulk.view()).ok());
  const DigestView bv = bulk.view();

  auto check_bound = [&](const DigestView& v, int s, int p, int upto) {
    const int block = f.Block(s, p);
    const auto* codes = static_cast<const int8_t*>(v.data);
    for (int h = 0; h < kHeads; ++h) {
      const float sc = v.scales[v.ScaleIndex(block, h)];
      for (int c = 0; c < head_dim; ++c) {
        const float hi = q8::Dequantize(codes[v.Offset(block, 0, h) + c], sc);
        const float lo = q8::Dequantize(codes[v.Offset(block, 1, h) + c], sc);
        for (int t = p * block_size; t < std::min(upto, (p + 1) * block_size); ++t) {
          const double k = f.Kv(0, s, t, h, c);
          if (!(hi >= k && lo <= k))
            return ::testing::AssertionFailure()
                   << "seq " << s << " token " << t << " head " << h << " channel " << c << ": key "
                   << k << " outside [" << lo << ", " << hi << "]";
        }
      }
    }
    return ::testing::AssertionSuccess();
  };

  std::vector<float> mx(head_dim), mn(head_dim);
  std::vector<int8_t> qmx(head_dim), qmn(head_dim);
  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int p = 0; p < NumPages(lens[s], block_size); ++p) {
      const int block = f.Block(s, p);
      ASSERT_TRUE(check_bound(bv, s, p, lens[s]));
      for (int h = 0; h < kHeads; ++h) {
        for (int c = 0; c < head_dim; ++c) {
          mx[c] = LoadAsFloat(native.data, dtype, native.Offset(block, 0, h) + c);
          mn[c] = LoadAsFloat(native.data, dtype, native.Offset(block, 1, h) + c);
        }
        const float sc = q8::QuantizeRows(mx.data(), mn.data(), head_dim, qmx.data(), qmn.data());
        ASSERT_EQ(q8::Bits(bv.scales[bv.ScaleIndex(block, h)]), q8::Bits(sc));
        ASSERT_EQ(std::memcmp(qmx.data(), bulk.codes.data() + bv.Offset(block, 0, h), head_dim), 0);
        ASSERT_EQ(std::memcmp(qmn.data(), bulk.codes.data() + bv.Offset(block, 1, h), head_dim), 0);
      }
      // The exact copy is the native digest.
      ASSERT_EQ(std::memcmp(bulk.exact.data() + native.Offset(block, 0, 0) * DTypeSize(dtype),
                            static_cast<const uint8_t*>(native.data) +
                                native.Offset(block, 0, 0) * DTypeSize(dtype),
                            native.BlockStride() * DTypeSize(dtype)),
                0);
    }
  }

  // Token-by-token replay: fused append into a NaN cache, and keys-only update.
  KvCacheView src = f.cache_view();
  std::vector<uint8_t> cache2(src.NumBytes());
  for (size_t i = 0; i < src.NumElems(); ++i) StoreFromFloat(cache2.data(), dtype, i, NAN);
  KvCacheView dst = src;
  dst.data = cache2.data();
  Int8Digests inc(native), keys_only(native);
  const size_t row = src.TokenStride() * DTypeSize(dtype);
  const int max_len = *std::max_element(lens.begin(), lens.end());
  for (int t = 0; t < max_len; ++t) {
    std::vector<int64_t> slots;
    std::vector<uint8_t> k, v;
    for (int s = 0; s < f.num_seqs(); ++s) {
      if (t >= lens[s]) continue;
      const int64_t slot = f.Slot(s, t);
      slots.push_back(slot);
      const auto* base = static_cast<const uint8_t*>(src.data);
      const auto* kp =
          base + src.Offset(0, slot / block_size, slot % block_size, 0) * DTypeSize(dtype);
      k.insert(k.end(), kp, kp + row);
      const auto* vp =
          base + src.Offset(1, slot / block_size, slot % block_size, 0) * DTypeSize(dtype);
      v.insert(v.end(), vp, vp + row);
    }
    slots.push_back(-1);  // padding slot: skipped
    k.resize(k.size() + row, 0xff);
    v.resize(v.size() + row, 0xff);
    const int n = static_cast<int>(slots.size());
    ASSERT_TRUE(AppendKvAndDigests(dst, slots.data(), n, k.data(), v.data(), inc.view()).ok());
    ASSERT_TRUE(
        UpdateDigestsFromKeys(keys_only.view(), block_size, slots.data(), n, k.data()).ok());
    for (int s = 0; s < f.num_seqs(); ++s) {
      if (t >= lens[s]) continue;
      ASSERT_TRUE(check_bound(inc.view(), s, t / block_size, t + 1)) << "after token " << t;
    }
  }
  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int p = 0; p < NumPages(lens[s], block_size); ++p) {
      ASSERT_TRUE(bulk.SameBlock(inc, f.Block(s, p))) << "seq " << s << " page " << p;
      ASSERT_TRUE(bulk.SameBlock(keys_only, f.Block(s, p))) << "seq " << s << " page " << p;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Int8DigestTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::Values(16, 32), ::testing::Values(64, 128)));

// Scores on int8 digests: each equals the canonical PageBound of the dequantized rows (bit for
// bit), and bounds every key of the page: score >= max over the page's tokens of q . k (minus
// the fp32 rounding of a head_dim-long sum), the Quest property the format exists to keep.
// The int8 bound is also never below the native one beyond rounding.
TEST(Int8Relevancy, ScoresBoundEveryKeyAndSelectionRuns) {
  std::mt19937_64 rng(TestSeed());
  constexpr int kHeads = 2, kGroup = 4, d = 128, bs = 16;
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = kHeads,
                       .head_dim = d,
                       .seq_lens = {700, 1500, 33}});
  const DigestView native = f.digest_view();
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), native).ok());
  Int8Digests i8(native);
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), i8.view()).ok());
  testing::RandomTensor q(rng, DType::kFloat32, static_cast<size_t>(3) * kHeads * kGroup * d);
  const QueryView qv{q.data(), DType::kFloat32, 3, kHeads * kGroup, d};
  const size_t n_scores = static_cast<size_t>(3) * kHeads * f.max_blocks();
  std::vector<float> s_nat(n_scores, NAN), s_i8(n_scores, NAN);
  for (GroupAggregation agg : {GroupAggregation::kMax, GroupAggregation::kSum}) {
    ASSERT_TRUE(
        ComputeRelevancy(qv, f.cache_view(), native, f.table_view(), agg, s_nat.data()).ok());
    ASSERT_TRUE(
        ComputeRelevancy(qv, f.cache_view(), i8.view(), f.table_view(), agg, s_i8.data(), 3).ok());
    const DigestView v = i8.view();
    std::vector<float> mx(d), mn(d);
    for (int s = 0; s < 3; ++s) {
      const int len = f.table_view().seq_lens[s];
      for (int h = 0; h < kHeads; ++h) {
        for (int p = 0; p < NumPages(len, bs); ++p) {
          const int block = f.Block(s, p);
          const float sc = v.scales[v.ScaleIndex(block, h)];
          for (int c = 0; c < d; ++c) {
            mx[c] = q8::Dequantize(static_cast<int8_t*>(v.data)[v.Offset(block, 0, h) + c], sc);
            mn[c] = q8::Dequantize(static_cast<int8_t*>(v.data)[v.Offset(block, 1, h) + c], sc);
          }
          float want = 0;
          double true_max = -1e300;
          for (int g = 0; g < kGroup; ++g) {
            const float* qg =
                q.values.data() + ((static_cast<size_t>(s) * kHeads + h) * kGroup + g) * d;
            const float b = PageBound(qg, mx.data(), mn.data(), d);
            want = g == 0 ? b : (agg == GroupAggregation::kMax ? std::max(want, b) : want + b);
            for (int t = p * bs; t < std::min(len, (p + 1) * bs); ++t) {
              double dot = 0, mag = 0;
              for (int c = 0; c < d; ++c) {
                dot += static_cast<double>(qg[c]) * f.Kv(0, s, t, h, c);
                mag += std::abs(static_cast<double>(qg[c]) *
                                std::max(std::abs(mx[c]), std::abs(mn[c])));
              }
              // fp32 sum of d terms: error <= d * 2^-24 * sum |terms| (a loose, safe bound).
              const double tol = d * 0x1p-24 * mag;
              if (agg == GroupAggregation::kMax) {
                ASSERT_GE(static_cast<double>(b) + tol, dot)
                    << "s " << s << " h " << h << " p " << p;
              }
              true_max = std::max(true_max, dot);
            }
          }
          const size_t at = (static_cast<size_t>(s) * kHeads + h) * f.max_blocks() + p;
          ASSERT_EQ(q8::Bits(s_i8[at]), q8::Bits(want)) << "s " << s << " h " << h << " p " << p;
          if (agg == GroupAggregation::kMax) {
            ASSERT_GE(s_i8[at], s_nat[at] - 1e-3f * std::abs(s_nat[at]) - 1e-3f);
          }
        }
      }
    }
  }

  // Selection through the CPU selector on int8 digests equals ScoreAndSelect on the view.
  CpuPageSelector sel(2);
  CacheShape shape{DType::kBFloat16, f.num_blocks(), bs, kHeads, d};
  shape.digest_format = DigestFormat::kInt8;
  ASSERT_TRUE(sel.AddLayer(0, shape).ok());
  ASSERT_TRUE(sel.BuildDigests(0, f.cache_view(), f.table_view()).ok());
  SelectionConfig cfg{.budget_tokens = 256};
  const int k = cfg.PagesPerHead(bs);
  std::vector<int32_t> p1(3 * kHeads * k, -9), c1(3 * kHeads, -9), p2 = p1, c2 = c1;
  ASSERT_TRUE(ScoreAndSelect(qv, f.cache_view(), i8.view(), f.table_view(), cfg,
                             SelectionView{p1.data(), c1.data(), 3, kHeads, k})
                  .ok());
  auto ticket =
      sel.Submit({0, qv, f.table_view(), cfg, SelectionView{p2.data(), c2.data(), 3, kHeads, k}});
  ASSERT_TRUE(ticket.ok());
  ASSERT_TRUE(sel.Wait(*ticket, absl::InfiniteFuture()).ok());
  EXPECT_EQ(p1, p2);
  EXPECT_EQ(c1, c2);
  ASSERT_TRUE(
      ValidateSelection(SelectionView{p2.data(), c2.data(), 3, kHeads, k}, f.table_view(), bs, cfg)
          .ok());
  absl::StatusOr<DigestView> dv = sel.Digests(0);
  ASSERT_TRUE(dv.ok());
  EXPECT_EQ(dv->format, DigestFormat::kInt8);
  for (int s = 0; s < 3; ++s) {
    for (int p = 0; p < NumPages(f.table_view().seq_lens[s], bs); ++p) {
      const size_t off = dv->Offset(f.Block(s, p), 0, 0);
      EXPECT_EQ(std::memcmp(static_cast<int8_t*>(dv->data) + off, i8.codes.data() + off,
                            dv->BlockStride()),
                0);
    }
  }
}

TEST(Int8DigestErrors, NameTheBadValue) {
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.seq_lens = {20}});
  Int8Digests i8(f.digest_view());
  DigestView v = i8.view();
  v.scales = nullptr;
  absl::Status s = BuildDigests(f.cache_view(), f.table_view(), v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("scales"), absl::string_view::npos) << s;
  v = i8.view();
  v.exact = nullptr;
  const int64_t slot = 0;
  s = UpdateDigestsFromKeys(v, 16, &slot, 1, i8.exact.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  v = i8.view();
  v.format = static_cast<DigestFormat>(7);
  s = BuildDigests(f.cache_view(), f.table_view(), v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("7"), absl::string_view::npos) << s;
  EXPECT_FALSE(ParseDigestFormat("fp8").ok());
  EXPECT_NE(ParseDigestFormat("fp8").status().message().find("fp8"), absl::string_view::npos);
  EXPECT_EQ(*ParseDigestFormat("int8"), DigestFormat::kInt8);
  CacheShape shape{DType::kFloat32, 4, 16, 1, 64};
  shape.digest_format = static_cast<DigestFormat>(3);
  CpuPageSelector sel;
  s = sel.AddLayer(0, shape);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("3"), absl::string_view::npos) << s;
  const int32_t bad_block = f.num_blocks();
  s = QuantizeDigestBlocks(i8.view(), &bad_block, 1);
  EXPECT_NE(s.message().find(std::to_string(bad_block)), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace mempipe
