// mempipe fpga: limits and element decoding shared by the HLS kernels and their host side.
//
// Device data are 512-bit words. A digest row (one page's max or min for one KV head) is
// head_dim elements of the cache dtype, a whole number of words for every supported head_dim
// (64..256 x 2 or 4 bytes); a query row is head_dim fp32 values. The score follows the canonical
// order of retriever/relevancy.h exactly (score_datapath.h), so the kernels' scores equal the CPU
// reference's bit for bit.
//
//   const int w = RowWords(head_dim, dtype);     // words in one digest row
//   float mx = DecodeElem(word, e, dtype);       // element e of a word as fp32
#ifndef MEMPIPE_FPGA_HLS_KERNEL_COMMON_H_
#define MEMPIPE_FPGA_HLS_KERNEL_COMMON_H_

#include <cstdint>

#include "fpga/hls/hls_compat.h"

namespace mempipe::fpga_hls {

using hls_compat::Word512;

// Element types, numbered as mempipe::DType (core/dtype.h).
inline constexpr int kDTypeF32 = 0;
inline constexpr int kDTypeF16 = 1;
inline constexpr int kDTypeBF16 = 2;

// Sizes the on-chip buffers are built for; the host checks requests against them.
inline constexpr int kMaxHeadDim = 256;
inline constexpr int kMaxGroup = 16;           // query heads per KV head (GQA ratio)
inline constexpr int kMaxPagesPerSeq = 65536;  // 1M tokens at page size 16
inline constexpr int kMaxTopK = 1024;          // middle pages kept per row
inline constexpr int kLanes = 32;              // retriever/relevancy.h kScoreLanes
inline constexpr int kMaxRowWords = kMaxHeadDim * 4 / hls_compat::kWordBytes;  // fp32 d=256

inline int ElemBytes(int dtype) { return dtype == kDTypeF32 ? 4 : 2; }
inline int ElemsPerWord(int dtype) { return hls_compat::kWordBytes / ElemBytes(dtype); }
inline int RowWords(int head_dim, int dtype) {
  return head_dim * ElemBytes(dtype) / hls_compat::kWordBytes;
}
inline int QueryRowWords(int head_dim) { return head_dim * 4 / hls_compat::kWordBytes; }

// Int8 digests (retriever/int8_quant.h). The kernels' `dtype` argument is a digest code: the
// cache dtype, plus kInt8DigestFlag for int8 digests. One block of a head's slice is then
//   [max codes: Int8RowWords][min codes: Int8RowWords][scale: fp32 in element 0 of one word]
//   [exact max row: RowWords(dtype)][exact min row: RowWords(dtype)]
// The score kernel reads the first Int8RecordWords words of a block (the record: 5 words =
// 320 B at head_dim 128, against 8 words = 512 B of a bf16 digest); the update kernel folds keys
// into the exact rows (kept on the card, never scanned) and rewrites the record from them.
inline constexpr int kInt8DigestFlag = 16;
inline bool IsInt8Digest(int code) { return (code & kInt8DigestFlag) != 0; }
inline int CacheDTypeOf(int code) { return code & ~kInt8DigestFlag; }
inline int Int8RowWords(int head_dim) { return head_dim / hls_compat::kWordBytes; }
inline int Int8RecordWords(int head_dim) { return 2 * Int8RowWords(head_dim) + 1; }
// Words of one block of a head's slice, and the words a score pass reads of it.
inline int BlockWords(int head_dim, int code) {
  const int exact = 2 * RowWords(head_dim, CacheDTypeOf(code));
  return IsInt8Digest(code) ? Int8RecordWords(head_dim) + exact : exact;
}
inline int ScanWords(int head_dim, int code) {
  return IsInt8Digest(code) ? Int8RecordWords(head_dim) : 2 * RowWords(head_dim, code);
}
inline int8_t Int8Elem(const Word512& w, int e) {
  return static_cast<int8_t>(hls_compat::GetBits8(w, e));
}

// IEEE binary16 to fp32, exact (the same mapping as mempipe::Half::ToFloat).
inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return hls_compat::BitsToFloat(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float v = static_cast<float>(mant) * hls_compat::BitsToFloat(0x33800000u);  // 2^-24
    return sign ? -v : v;
  }
  return hls_compat::BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Element e of word w as fp32.
inline float DecodeElem(const Word512& w, int e, int dtype) {
  if (dtype == kDTypeF32) return hls_compat::BitsToFloat(hls_compat::GetBits32(w, e));
  const uint16_t bits = hls_compat::GetBits16(w, e);
  if (dtype == kDTypeF16) return HalfBitsToFloat(bits);
  return hls_compat::BitsToFloat(static_cast<uint32_t>(bits) << 16);
}

// Copies element e of `from` into element e of `to` (bits unchanged).
inline void CopyElem(const Word512& from, Word512& to, int e, int dtype) {
  if (dtype == kDTypeF32) {
    hls_compat::SetBits32(to, e, hls_compat::GetBits32(from, e));
  } else {
    hls_compat::SetBits16(to, e, hls_compat::GetBits16(from, e));
  }
}

}  // namespace mempipe::fpga_hls

#endif  // MEMPIPE_FPGA_HLS_KERNEL_COMMON_H_
