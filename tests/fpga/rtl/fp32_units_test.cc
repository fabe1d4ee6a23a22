// The RTL fp32 units (fpga/rtl/mempipe_fp32.sv) against the host's IEEE arithmetic bit for bit:
// products, sums, ordered compares and fp16 decoding on random bit patterns drawn to hit
// subnormals, zeros, infinities, NaNs, exponent extremes and rounding ties; plus a check that
// the comparison rejects a known-wrong unit (a result off by one ulp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "Vfp32_units_top.h"
#include "fpga/hls/kernel_common.h"
#include "gtest/gtest.h"
#include "tests/fpga/test_data.h"

namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float Float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
bool IsNan(uint32_t u) { return (u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0; }

// Equal bit for bit; NaN results must both be NaN with the same bits when the reference made a
// fresh one (default NaN) or propagated the first NaN operand.
bool Same(uint32_t want, uint32_t got) { return want == got; }

// Random operand, weighted toward special and boundary encodings.
uint32_t Draw(std::mt19937_64& rng) {
  const uint32_t sign = static_cast<uint32_t>(rng() & 1) << 31;
  const uint32_t mant = static_cast<uint32_t>(rng()) & 0x7fffffu;
  switch (rng() % 10) {
    case 0:
      return sign | (mant >> (rng() % 23));  // subnormal
    case 1:
      return sign;  // zero
    case 2:
      return sign | 0x7f800000u;  // inf
    case 3:
      return sign | 0x7f800000u | (mant | 1);  // NaN
    case 4:
      return sign | ((1 + rng() % 30) << 23) | mant;  // tiny normal
    case 5:
      return sign | ((224 + rng() % 31) << 23) | mant;  // huge normal
    case 6:
      return sign | ((127 + static_cast<int>(rng() % 8) - 4) << 23) | (mant & ~0xfffu);
    default:
      return static_cast<uint32_t>(rng());
  }
}

class Units {
 public:
  struct Out {
    uint32_t p, s, h2f;
    bool gt;
  };
  Out Eval(uint32_t a, uint32_t b) {
    top_.a = a;
    top_.b = b;
    top_.eval();
    return {top_.p, top_.s, top_.h2f, top_.gt != 0};
  }

 private:
  Vfp32_units_top top_;
};

TEST(RtlFp32, MatchesHostArithmetic) {
  std::mt19937_64 rng(mempipe::testing::FreshSeed("RtlFp32.MatchesHostArithmetic"));
  Units u;
  for (int i = 0; i < 400000; ++i) {
    uint32_t a = Draw(rng), b = Draw(rng);
    if (i % 4 == 0) b = (a & 0xff800000u) ^ (static_cast<uint32_t>(rng()) & 0x80ffffffu);  // near
    const Units::Out o = u.Eval(a, b);
    const float fa = Float(a), fb = Float(b);
    const uint32_t want_p = Bits(fa * fb), want_s = Bits(fa + fb);
    ASSERT_TRUE(Same(want_p, o.p))
        << std::hex << a << " * " << b << " want " << want_p << " got " << o.p;
    ASSERT_TRUE(Same(want_s, o.s))
        << std::hex << a << " + " << b << " want " << want_s << " got " << o.s;
    ASSERT_EQ(fa > fb, o.gt) << std::hex << a << " > " << b;
    const float h = mempipe::fpga_hls::HalfBitsToFloat(static_cast<uint16_t>(a));
    ASSERT_EQ(Bits(h), o.h2f) << std::hex << "half " << (a & 0xffff);
  }
}

// The pipelined units the kernel instantiates: one operand pair per clock, each result checked
// MUL_STAGES - 1 (product) and ADD_STAGES - 1 (sum) clocks later, bit for bit, against the
// combinational units on the same operands (checked against the host above) and against the host
// unless both operands are NaN (which NaN x86 returns then depends on the compiler's operand
// order; the combinational check above fixes the RTL's rule).
TEST(RtlFp32, PipelinedUnitsMatchHostArithmetic) {
  constexpr int kMulLatency = 4, kAddLatency = 3;
  std::mt19937_64 rng(mempipe::testing::FreshSeed("RtlFp32.PipelinedUnitsMatchHostArithmetic"));
  Vfp32_units_top top;
  struct In {
    uint32_t a, b, p, s;  // operands, combinational product and sum
  };
  std::vector<In> in;
  top.clk = 0;
  top.eval();
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    uint32_t a = Draw(rng), b = Draw(rng);
    if (i % 4 == 0) b = (a & 0xff800000u) ^ (static_cast<uint32_t>(rng()) & 0x80ffffffu);
    top.a = a;
    top.b = b;
    top.eval();
    in.push_back({a, b, top.p, top.s});
    top.clk = 1;  // the operands enter the first stage registers
    top.eval();
    top.clk = 0;
    top.eval();
    // The last stage's registers now hold the pair that entered kMulLatency (kAddLatency)
    // clocks ago, in[n - latency]; its result is combinational from them.
    const int n = static_cast<int>(in.size());
    if (n >= kMulLatency) {
      const In& x = in[n - kMulLatency];
      ASSERT_EQ(x.p, top.pp) << std::hex << x.a << " * " << x.b;
      if (!IsNan(x.a) || !IsNan(x.b)) {
        ASSERT_EQ(Bits(Float(x.a) * Float(x.b)), top.pp) << std::hex << x.a << " * " << x.b;
      }
      ++checked;
    }
    if (n >= kAddLatency) {
      const In& x = in[n - kAddLatency];
      ASSERT_EQ(x.s, top.sp) << std::hex << x.a << " + " << x.b;
      if (!IsNan(x.a) || !IsNan(x.b)) {
        ASSERT_EQ(Bits(Float(x.a) + Float(x.b)), top.sp) << std::hex << x.a << " + " << x.b;
      }
    }
  }
  EXPECT_GT(checked, 199000);
}

TEST(RtlFp32, AllHalvesDecodeExactly) {
  Units u;
  for (uint32_t h = 0; h < 65536; ++h) {
    ASSERT_EQ(Bits(mempipe::fpga_hls::HalfBitsToFloat(static_cast<uint16_t>(h))), u.Eval(h, 0).h2f)
        << std::hex << h;
  }
}

// The compare above must reject a unit whose result is off by one ulp.
TEST(RtlFp32, ComparisonRejectsAnUlpError) {
  Units u;
  const Units::Out o = u.Eval(Bits(1.1f), Bits(3.3f));
  EXPECT_TRUE(Same(Bits(1.1f * 3.3f), o.p));
  EXPECT_FALSE(Same(Bits(1.1f * 3.3f), o.p + 1));
  EXPECT_FALSE(Same(Bits(1.1f + 3.3f), o.s ^ 1));
}

}  // namespace
