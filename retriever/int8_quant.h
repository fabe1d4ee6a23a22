// mempipe retriever: int8 page digests, the quantization every device applies (header-only,
// no dependencies: included by the CPU reference, the GPU kernels and the HLS kernels alike).
//
// Per (page, KV head), from the exact digest (the fp32 values of the stored max_c and min_c):
//   m   = max over channels c of max(|max_c|, |min_c|)                  (exact: selects values)
//   s   = Scale(m):  s0 = fl(m / 127); s = s0 if fl(127 * s0) >= m, else nextup(s0)
//         (0 for m == 0; +inf when any max_c/min_c is not finite)
//   qmax_c = QuantizeUp(max_c, s):   c = clamp(ceil(fl(max_c / s)), -127, 127);
//                                    c + 1 if fl(c * s) < max_c, else c
//   qmin_c = QuantizeDown(min_c, s): c = clamp(floor(fl(min_c / s)), -127, 127);
//                                    c - 1 if fl(c * s) > min_c, else c
//   dequantized bound: Dequantize(q, s) = fl(float(q) * s), ONE fp32 multiply (int8 -> fp32 is
//   exact; no FMA can arise). For s = +inf every qmax is 127 and every qmin -127, so the bound is
//   [-inf, +inf] (as a native digest holding an infinity bounds nothing either).
// fl() is IEEE binary32 round-to-nearest-even with subnormals (no flush to zero), the same on
// every device: GPU code uses __fdiv_rn/__fmul_rn, host code is built with -ffp-contract=off.
//
// Proof that the bound holds exactly in fp32: fl(qmax_c * s) >= max_c and fl(qmin_c * s) <= min_c.
//  (1) fl(127 * s) >= m. Round-to-nearest gives |s0 - m/127| <= ulp(s0)/2, where ulp(s0) is the
//      spacing above s0 (this includes s0 = 0 after underflow, spacing 2^-149). If
//      127 * s0 >= m then fl(127 * s0) >= m (rounding is monotone and m is representable).
//      Otherwise s0 < m/127 and nextup(s0) = s0 + ulp(s0) >= m/127 + ulp(s0)/2 > m/127, so
//      127 * s > m and again fl(127 * s) >= m. (m <= FLT_MAX, so s and 127 s stay finite.)
//  (2) fl(q * s) is non-decreasing in q (monotone rounding), and |max_c| <= m <= fl(127 s).
//  (3) QuantizeUp: let x = max_c / s (exact real), y = fl(x). |x| <= 127 (1 + 2^-23), so
//      |y - x| <= ulp(128)/2 = 2^-17. c0 = ceil(y) >= y >= x - 2^-17; clamping to [-127, 127]
//      keeps c >= x - 2^-17 unless c0 > 127, and then c = 127 satisfies fl(127 s) >= m >= max_c
//      by (1). If c >= x then c * s >= max_c exactly, so fl(c * s) >= max_c and c is kept.
//      Otherwise x - 2^-17 <= c < x, so c + 1 > x, (c + 1) * s > max_c and fl((c + 1) s) >=
//      max_c; and c + 1 <= 127 because c = 127 never fails the test. One correction suffices.
//  (4) QuantizeDown is (3) mirrored: fl is symmetric under negation, and -min_c <= m.
//  (5) s = 0 only for m = 0: every max_c and min_c is +-0, q = 0, and 0 * 0 = +0 >= +-0.
//  So qmax_c, qmin_c lie in [-127, 127] (never -128) and the dequantized bound widens the exact
//  one: the Quest bound sum_c max(q_c deq(qmax_c), q_c deq(qmin_c)) >= q . k for every key k of
//  the page (in exact arithmetic; the fp32 score then follows the canonical order of
//  relevancy.h like every other digest). Also deq(qmax_c) >= max_c >= min_c >= deq(qmin_c), so
//  the GPU's sign-select of the bound row (select_gpu.hip) stays exact.
//
//   const float s = int8_digest::Scale(m);
//   int8_t hi = int8_digest::QuantizeUp(max_c, s), lo = int8_digest::QuantizeDown(min_c, s);
//   float bound_hi = int8_digest::Dequantize(hi, s);
#ifndef MEMPIPE_RETRIEVER_INT8_QUANT_H_
#define MEMPIPE_RETRIEVER_INT8_QUANT_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMPIPE_INT8_HD __host__ __device__
#else
#define MEMPIPE_INT8_HD
#endif

namespace mempipe::int8_digest {

inline constexpr int kQLimit = 127;  // codes lie in [-127, 127]

MEMPIPE_INT8_HD inline uint32_t Bits(float f) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
MEMPIPE_INT8_HD inline float FromBits(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
MEMPIPE_INT8_HD inline float Inf() { return FromBits(0x7f800000u); }
MEMPIPE_INT8_HD inline bool IsFinite(float f) { return (Bits(f) & 0x7f800000u) != 0x7f800000u; }

// IEEE round-to-nearest division and product, never fused or approximated.
MEMPIPE_INT8_HD inline float Div(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MEMPIPE_INT8_HD inline float Mul(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Folds one channel into the running magnitude: m = max(m, |mx|, |mn|); `finite` clears on a
// non-finite value (NaN included, which comparisons alone would drop).
MEMPIPE_INT8_HD inline void FoldMagnitude(float mx, float mn, float& m, bool& finite) {
  finite = finite && IsFinite(mx) && IsFinite(mn);
  const float a = FromBits(Bits(mx) & 0x7fffffffu);
  const float b = FromBits(Bits(mn) & 0x7fffffffu);
  m = a > m ? a : m;
  m = b > m ? b : m;
}

// s from the magnitude m >= 0 (finite: every channel finite), steps (1) and (5) above.
MEMPIPE_INT8_HD inline float Scale(float m, bool finite) {
  if (!finite) return Inf();
  if (m == 0.0f) return 0.0f;
  const float s0 = Div(m, 127.0f);
  if (Mul(127.0f, s0) >= m) return s0;
  return FromBits(Bits(s0) + 1u);  // nextup of a non-negative finite float
}

MEMPIPE_INT8_HD inline float Dequantize(int8_t q, float s) { return Mul(static_cast<float>(q), s); }

// qmax_c: step (3).
MEMPIPE_INT8_HD inline int8_t QuantizeUp(float v, float s) {
  if (s == 0.0f) return 0;
  if (!IsFinite(s)) return kQLimit;
  float c = std::ceil(Div(v, s));
  c = c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c);
  int q = static_cast<int>(c);
  if (Mul(static_cast<float>(q), s) < v) ++q;
  return static_cast<int8_t>(q);
}

// qmin_c: step (4).
MEMPIPE_INT8_HD inline int8_t QuantizeDown(float v, float s) {
  if (s == 0.0f) return 0;
  if (!IsFinite(s)) return -kQLimit;
  float c = std::floor(Div(v, s));
  c = c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c);
  int q = static_cast<int>(c);
  if (Mul(static_cast<float>(q), s) > v) --q;
  return static_cast<int8_t>(q);
}

// Quantizes one (page, head): exact fp32 rows mx/mn [head_dim] -> codes qmx/qmn, returns s.
MEMPIPE_INT8_HD inline float QuantizeRows(const float* mx, const float* mn, int head_dim,
                                          int8_t* qmx, int8_t* qmn) {
  float m = 0.0f;
  bool finite = true;
  for (int c = 0; c < head_dim; ++c) FoldMagnitude(mx[c], mn[c], m, finite);
  const float s = Scale(m, finite);
  for (int c = 0; c < head_dim; ++c) {
    qmx[c] = QuantizeUp(mx[c], s);
    qmn[c] = QuantizeDown(mn[c], s);
  }
  return s;
}

}  // namespace mempipe::int8_digest

#endif  // MEMPIPE_RETRIEVER_INT8_QUANT_H_
