// mempipe core: storage data types and their conversions on the host.
//
// The KV cache, digests and queries are stored as fp32, fp16 or bf16; every computation runs
// in fp32. `Half` and `BFloat16` are plain 16-bit containers with round-to-nearest-even
// conversion, so host code needs no compiler extension and matches the GPU's conversions.
//
//   mempipe::BFloat16 b = mempipe::BFloat16::FromFloat(1.5f);
//   float f = b.ToFloat();                          // 1.5f
//   auto dt = mempipe::ParseDType("bf16");          // StatusOr<DType>
#ifndef MEMPIPE_CORE_DTYPE_H_
#define MEMPIPE_CORE_DTYPE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace mempipe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every dtype the cache, digests and queries may use (Python: mempipe._mempipe.supported_dtypes).
inline constexpr DType kSupportedDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

inline constexpr size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline constexpr absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "fp32";
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
  }
  return "?";
}

// Accepts fp32|float32|float, fp16|float16|half, bf16|bfloat16.
inline absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "fp32" || name == "float32" || name == "float") return DType::kFloat32;
  if (name == "fp16" || name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bf16" || name == "bfloat16") return DType::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype must be fp32, fp16 or bf16, got '", name, "'"));
}

namespace internal {
inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace internal

// IEEE binary16 container.
struct Half {
  uint16_t bits = 0;

  static Half FromBits(uint16_t b) { return Half{b}; }

  static Half FromFloat(float f) {
    const uint32_t x = internal::FloatBits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // Inf or NaN: keep NaN quiet and non-zero.
      return Half{static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
    }
    if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow
    if (abs < 0x38800000u) {  // subnormal or zero in fp16
      // Scale into the subnormal range with one fp32 add that rounds to nearest even.
      const float magic = internal::BitsFloat(0x3f000000u);  // 0.5: ulp of 2^-24 at 2^-1
      const float r = internal::BitsFloat(abs) + magic;
      return Half{static_cast<uint16_t>(sign | (internal::FloatBits(r) - 0x3f000000u))};
    }
    const uint32_t mant_odd = (abs >> 13) & 1u;
    uint32_t v = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
    return Half{static_cast<uint16_t>(sign | (v >> 13))};
  }

  float ToFloat() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exp = (bits >> 10) & 0x1fu;
    const uint32_t mant = bits & 0x3ffu;
    if (exp == 0x1f) return internal::BitsFloat(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
      const float v = static_cast<float>(mant) * internal::BitsFloat(0x33800000u);  // 2^-24
      return sign ? -v : v;
    }
    return internal::BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  }
};

// bfloat16 container (the top half of an fp32).
struct BFloat16 {
  uint16_t bits = 0;

  static BFloat16 FromBits(uint16_t b) { return BFloat16{b}; }

  static BFloat16 FromFloat(float f) {
    const uint32_t x = internal::FloatBits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
    const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
    return BFloat16{static_cast<uint16_t>((x + rounding) >> 16)};
  }

  float ToFloat() const { return internal::BitsFloat(static_cast<uint32_t>(bits) << 16); }
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2);

// Storage-type traits: `StorageOf<DType::kBFloat16>` is `BFloat16`, and so on.
template <DType D>
struct StorageOfImpl;
template <>
struct StorageOfImpl<DType::kFloat32> {
  using type = float;
};
template <>
struct StorageOfImpl<DType::kFloat16> {
  using type = Half;
};
template <>
struct StorageOfImpl<DType::kBFloat16> {
  using type = BFloat16;
};
template <DType D>
using StorageOf = typename StorageOfImpl<D>::type;

inline float ToFloat(float v) { return v; }
inline float ToFloat(Half v) { return v.ToFloat(); }
inline float ToFloat(BFloat16 v) { return v.ToFloat(); }

template <typename T>
T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) {
  return v;
}
template <>
inline Half FromFloat<Half>(float v) {
  return Half::FromFloat(v);
}
template <>
inline BFloat16 FromFloat<BFloat16>(float v) {
  return BFloat16::FromFloat(v);
}

// The index of the first element of `data` [n] that is not finite (inf or NaN), or n when all
// are. It tests the exponent bits of the raw elements (all ones: not finite), a loop over plain
// integers that the compiler vectorizes, and only when one is found looks for the first; a
// per-element LoadAsFloat and std::isfinite cost the relevancy scan about a tenth of its time
// at one thread (SmolLM2's 4 x 9 query rows).
template <typename Bits, Bits kExponent>
size_t FirstNonFiniteBits(const Bits* v, size_t n) {
  constexpr size_t kChunk = 256;
  for (size_t i0 = 0; i0 < n; i0 += kChunk) {
    const size_t i1 = n - i0 < kChunk ? n : i0 + kChunk;
    // The smallest ~v & kExponent: 0 where an exponent is all ones. A min reduction, which GCC
    // vectorizes for 16-bit elements too; an OR of comparisons it left scalar for them (1.1 us
    // for SmolLM2's 4 x 9 bf16 query rows on the build VM, 0.1 us this way).
    Bits low = kExponent;
    for (size_t i = i0; i < i1; ++i)
      low = std::min<Bits>(low, static_cast<Bits>(~v[i] & kExponent));
    if (low != 0) continue;
    for (size_t i = i0; i < i1; ++i) {
      if ((v[i] & kExponent) == kExponent) return i;
    }
  }
  return n;
}
inline size_t FirstNonFinite(const void* data, DType dtype, size_t n) {
  switch (dtype) {
    case DType::kFloat32:
      return FirstNonFiniteBits<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(data), n);
    case DType::kFloat16:
      return FirstNonFiniteBits<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(data), n);
    case DType::kBFloat16:
      return FirstNonFiniteBits<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(data), n);
  }
  return n;
}

// Reads element `i` of a buffer of `dtype` as fp32.
inline float LoadAsFloat(const void* data, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(data)[i];
    case DType::kFloat16:
      return static_cast<const Half*>(data)[i].ToFloat();
    case DType::kBFloat16:
      return static_cast<const BFloat16*>(data)[i].ToFloat();
  }
  return 0.0f;
}

// Writes fp32 `v` rounded to `dtype` into element `i`.
inline void StoreFromFloat(void* data, DType dtype, size_t i, float v) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(data)[i] = v;
      break;
    case DType::kFloat16:
      static_cast<Half*>(data)[i] = Half::FromFloat(v);
      break;
    case DType::kBFloat16:
      static_cast<BFloat16*>(data)[i] = BFloat16::FromFloat(v);
      break;
  }
}

// Calls `fn.template operator()<T>()` with T the storage type of `dtype`.
template <typename Fn>
decltype(auto) DispatchDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn.template operator()<Half>();
    case DType::kBFloat16:
      return fn.template operator()<BFloat16>();
    case DType::kFloat32:
      break;
  }
  return fn.template operator()<float>();
}

}  // namespace mempipe

#endif  // MEMPIPE_CORE_DTYPE_H_
