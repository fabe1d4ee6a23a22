// Test support: host storage for an int8 digest (retriever/digest.h kInt8) shaped like a native
// one, poisoned so that unwritten entries cannot pass a comparison: codes -128 (outside
// [-127, 127]), scales NaN, exact rows NaN.
//
//   Int8Digests q(f.digest_view());      // same geometry as the fixture's native digest
//   BuildDigests(f.cache_view(), f.table_view(), q.view());
#ifndef MEMPIPE_TESTS_TESTING_INT8_DIGESTS_H_
#define MEMPIPE_TESTS_TESTING_INT8_DIGESTS_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "retriever/digest.h"

namespace mempipe::testing {

struct Int8Digests {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<uint8_t> exact;
  DigestView shape;

  explicit Int8Digests(const DigestView& like) : shape(like) {
    shape.format = DigestFormat::kInt8;
    codes.assign(shape.NumElems(), 0x80);
    scales.assign(shape.ScaleBytes() / sizeof(float), NAN);
    exact.assign(shape.ExactBytes(), 0);
    for (size_t i = 0; i < shape.NumElems(); ++i) StoreFromFloat(exact.data(), like.dtype, i, NAN);
  }
  DigestView view() {
    DigestView v = shape;
    v.data = codes.data();
    v.scales = scales.data();
    v.exact = exact.data();
    return v;
  }
  // Bytes of (codes, scale, exact rows) of `block`, for comparisons.
  bool SameBlock(const Int8Digests& o, int block) const {
    const size_t stride = shape.BlockStride();
    const size_t hs = static_cast<size_t>(shape.num_kv_heads);
    const size_t eb = DTypeSize(shape.dtype);
    return std::memcmp(codes.data() + block * stride, o.codes.data() + block * stride, stride) ==
               0 &&
           std::memcmp(scales.data() + block * hs, o.scales.data() + block * hs,
                       hs * sizeof(float)) == 0 &&
           std::memcmp(exact.data() + block * stride * eb, o.exact.data() + block * stride * eb,
                       stride * eb) == 0;
  }
};

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_TESTING_INT8_DIGESTS_H_
