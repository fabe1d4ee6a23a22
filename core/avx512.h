// mempipe core: the AVX-512 and AVX2 intrinsics for the host kernels, without requiring
// -mavx512f or -mavx2.
//
// Functions that use AVX-512 are marked MEMPIPE_TARGET_AVX512, those that use AVX2 with FMA and
// F16C MEMPIPE_TARGET_AVX2: compiled for them whatever -march says, and only called after the
// run-time check (UseAvx512Kernel(), UseAvx2Kernel(), core/cpu_kernel.h), so the default build
// stays portable. MEMPIPE_AVX512_KERNEL and MEMPIPE_AVX2_KERNEL are 0 where the compiler cannot
// build them (then only the portable kernels exist). Include this header from .cc files only.
#ifndef MEMPIPE_CORE_AVX512_H_
#define MEMPIPE_CORE_AVX512_H_

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*()
// values; the warning is attributed to the header's lines, so it is silenced for them only.
#pragma GCC diagnostic push
#if !defined(__clang__)  // clang (clang-tidy in .ci/lint.sh) has no -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define MEMPIPE_AVX512_KERNEL 1
#define MEMPIPE_TARGET_AVX512 __attribute__((target("avx512f")))
// AVX512_BF16's dot products (vdpbf16ps) and AVX512BW; called only after UseAvx512Bf16Kernel()
// (core/cpu_kernel.h).
#define MEMPIPE_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
// AVX2 with FMA and F16C (x86-64-v3: Intel from Haswell, AMD from Zen 1); called only after
// UseAvx2Kernel().
#define MEMPIPE_AVX2_KERNEL 1
#define MEMPIPE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MEMPIPE_AVX512_KERNEL 0
#define MEMPIPE_AVX2_KERNEL 0
#endif

#if MEMPIPE_AVX512_KERNEL
namespace mempipe {

// BFloat16::FromFloat (core/dtype.h) of 16 floats at once, bit for bit: rounded to nearest
// even, a NaN kept a quiet NaN. The bf16 bits lie in the low halves of the 32-bit lanes, the
// high halves zero.
MEMPIPE_TARGET_AVX512 inline __m512i Bf16BitsFromFloat(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i top = _mm512_srli_epi32(x, 16);
  const __m512i rounding =
      _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(top, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(x, rounding), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(rounded, nan, top, _mm512_set1_epi32(0x40));
}

}  // namespace mempipe
#endif

#endif  // MEMPIPE_CORE_AVX512_H_
