#include "core/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/avx512.h"
#include "core/cpu_kernel.h"
#include "gtest/gtest.h"

namespace mempipe {
namespace {

// Every fp16 bit pattern survives a round trip through fp32, and the conversion from fp32
// matches the compiler's own _Float16 (round to nearest even) on a sweep of fp32 values.
TEST(DType, HalfRoundTripsEveryBitPattern) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const Half h = Half::FromBits(static_cast<uint16_t>(b));
    const float f = h.ToFloat();
    _Float16 ref;
    const uint16_t bits16 = static_cast<uint16_t>(b);
    std::memcpy(&ref, &bits16, 2);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(static_cast<float>(ref))) << b;
      continue;
    }
    ASSERT_EQ(f, static_cast<float>(ref)) << "bits " << b;
    ASSERT_EQ(Half::FromFloat(f).bits, b) << "bits " << b;
  }
}

TEST(DType, HalfFromFloatMatchesCompiler) {
  for (uint64_t u = 0; u < 0x100000000ull; u += 4099) {  // a stride coprime with the mantissa
    const uint32_t bits = static_cast<uint32_t>(u);
    float f;
    std::memcpy(&f, &bits, 4);
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    const uint16_t got = Half::FromFloat(f).bits;
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(Half::FromBits(got).ToFloat()));
    } else {
      ASSERT_EQ(got, ref_bits) << "fp32 bits 0x" << std::hex << bits;
    }
  }
}

TEST(DType, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(BFloat16::FromFloat(1.0f).bits, 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(BFloat16::FromFloat(1.0f + 1.0f / 256).bits, 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
  EXPECT_EQ(BFloat16::FromFloat(1.0f + 3.0f / 256).bits, 0x3f82);
  EXPECT_TRUE(std::isnan(BFloat16::FromFloat(NAN).ToFloat()));
  EXPECT_EQ(BFloat16::FromFloat(INFINITY).ToFloat(), INFINITY);
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const BFloat16 v = BFloat16::FromBits(static_cast<uint16_t>(b));
    if (std::isnan(v.ToFloat())) continue;
    ASSERT_EQ(BFloat16::FromFloat(v.ToFloat()).bits, b);
  }
}

#if MEMPIPE_AVX512_KERNEL
// Bf16BitsFromFloat (core/avx512.h) of 16 fp32 bit patterns, as 16-bit bf16 patterns.
MEMPIPE_TARGET_AVX512 void VectorBf16(const uint32_t* in, uint16_t* out) {
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, Bf16BitsFromFloat(_mm512_castsi512_ps(_mm512_loadu_si512(in))));
  for (int i = 0; i < 16; ++i) {
    ASSERT_EQ(lanes[i] >> 16, 0u) << "high half of lane " << i;
    out[i] = static_cast<uint16_t>(lanes[i]);
  }
}
#endif

// The AVX-512 kernels' vector rounding to bf16 (decode's output rows) equals BFloat16::FromFloat
// bit for bit: every tie class, NaNs (payloads, signs, signalling ones made quiet), infinities,
// subnormals, the largest finite values that round to infinity, and a sweep of fp32 patterns.
TEST(DType, Bf16BitsFromFloatMatchesScalar) {
#if MEMPIPE_AVX512_KERNEL
  if (!UseAvx512Kernel()) GTEST_SKIP() << "no AVX-512 on this CPU";
  std::vector<uint32_t> bits = {0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0x7f800001u,
                                0xff800001u, 0x7fc00000u, 0x7f800000u, 0xff800000u, 0x00008000u,
                                0x00018000u, 0x80000001u, 0x7f7fffffu, 0x7f7f8000u, 0xff7f8000u,
                                0x0u,        0x80000000u, 0x7fbfffffu, 0x3f80ffffu, 0x00ff8000u};
  for (uint64_t u = 0; u < 0x100000000ull; u += 4099) bits.push_back(static_cast<uint32_t>(u));
  while (bits.size() % 16 != 0) bits.push_back(0x3f808000u);
  uint16_t got[16];
  for (size_t i = 0; i < bits.size(); i += 16) {
    VectorBf16(&bits[i], got);
    for (int j = 0; j < 16; ++j) {
      float f;
      std::memcpy(&f, &bits[i + j], 4);
      ASSERT_EQ(got[j], BFloat16::FromFloat(f).bits) << "fp32 bits 0x" << std::hex << bits[i + j];
    }
  }
#else
  GTEST_SKIP() << "built without the AVX-512 kernels";
#endif
}

TEST(DType, ParseNamesTheBadValue) {
  EXPECT_EQ(*ParseDType("bf16"), DType::kBFloat16);
  EXPECT_EQ(*ParseDType("float16"), DType::kFloat16);
  auto bad = ParseDType("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fp8"), absl::string_view::npos);
}

// FirstNonFinite agrees with std::isfinite on every fp16 and bf16 bit pattern and on a sweep
// of fp32 patterns, finds the first of several bad elements wherever it lies against its
// 256-element chunks, and returns n for an all-finite buffer (the largest finite values
// included).
TEST(DType, FirstNonFiniteMatchesIsFinite) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    ASSERT_EQ(FirstNonFinite(&bits, DType::kFloat16, 1) == 0,
              !std::isfinite(Half::FromBits(bits).ToFloat()))
        << "fp16 bits " << b;
    ASSERT_EQ(FirstNonFinite(&bits, DType::kBFloat16, 1) == 0,
              !std::isfinite(BFloat16::FromBits(bits).ToFloat()))
        << "bf16 bits " << b;
  }
  for (uint64_t u = 0; u < 0x100000000ull; u += 4099) {
    const uint32_t bits = static_cast<uint32_t>(u);
    float f;
    std::memcpy(&f, &bits, 4);
    ASSERT_EQ(FirstNonFinite(&f, DType::kFloat32, 1) == 0, !std::isfinite(f)) << "bits " << u;
  }
  const float kBad[] = {std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::quiet_NaN()};
  for (const DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const size_t n = 1000;
    std::vector<uint8_t> buf(n * DTypeSize(dt));
    // The largest finite value of the dtype, and its negative, everywhere else.
    const float big = dt == DType::kFloat16    ? 65504.0f
                      : dt == DType::kBFloat16 ? BFloat16::FromBits(0x7f7f).ToFloat()
                                               : std::numeric_limits<float>::max();
    for (size_t i = 0; i < n; ++i) StoreFromFloat(buf.data(), dt, i, i % 2 ? big : -big);
    ASSERT_EQ(FirstNonFinite(buf.data(), dt, n), n) << DTypeName(dt);
    ASSERT_EQ(FirstNonFinite(buf.data(), dt, 0), 0u) << DTypeName(dt);
    for (const size_t first :
         {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{511}, size_t{700}, n - 1}) {
      for (const float bad : kBad) {
        std::vector<uint8_t> b = buf;
        StoreFromFloat(b.data(), dt, first, bad);
        if (first + 3 < n) StoreFromFloat(b.data(), dt, first + 3, bad);  // a later one too
        if (first + 300 < n) StoreFromFloat(b.data(), dt, first + 300, bad);
        EXPECT_EQ(FirstNonFinite(b.data(), dt, n), first)
            << DTypeName(dt) << " " << bad << " at " << first;
        EXPECT_EQ(FirstNonFinite(b.data(), dt, first), first) << "only the finite prefix";
      }
    }
  }
}

}  // namespace
}  // namespace mempipe
