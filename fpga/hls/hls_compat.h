// mempipe fpga: the few Vitis-HLS types the kernels use, for synthesis and for g++.
//
// Under Vitis HLS (`__SYNTHESIS__` defined) these are the vendor's `ap_uint<512>` and
// `hls::stream`. Everywhere else they are small host stand-ins with the same semantics the
// kernels rely on, so the kernel sources in this folder compile with g++ for the emulated
// U55C and the C-simulation tests. `#pragma HLS` lines are ignored by g++
// (the fpga target builds with -Wno-unknown-pragmas).
//
//   hls_compat::Word512 w{};
//   hls_compat::SetBits16(w, 3, 0x3c00);     // element 3 of a 16-bit vector
//   hls_compat::Stream<hls_compat::Word512> s;
//   s.write(w); w = s.read();
#ifndef MEMPIPE_FPGA_HLS_HLS_COMPAT_H_
#define MEMPIPE_FPGA_HLS_HLS_COMPAT_H_

#include <cstdint>

#ifdef __SYNTHESIS__
#include <ap_int.h>
#include <hls_stream.h>
#else
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <vector>
#endif

namespace mempipe::hls_compat {

// Bytes of one AXI beat: the U55C platform's 512-bit datapath (UG1120).
inline constexpr int kWordBytes = 64;

#ifdef __SYNTHESIS__

using Word512 = ap_uint<512>;
template <typename T>
using Stream = hls::stream<T>;

inline uint32_t GetBits32(const Word512& w, int i) { return w.range(32 * i + 31, 32 * i); }
inline uint16_t GetBits16(const Word512& w, int i) { return w.range(16 * i + 15, 16 * i); }
inline void SetBits32(Word512& w, int i, uint32_t v) { w.range(32 * i + 31, 32 * i) = v; }
inline void SetBits16(Word512& w, int i, uint16_t v) { w.range(16 * i + 15, 16 * i) = v; }
inline uint8_t GetBits8(const Word512& w, int i) { return w.range(8 * i + 7, 8 * i); }
inline void SetBits8(Word512& w, int i, uint8_t v) { w.range(8 * i + 7, 8 * i) = v; }

inline float BitsToFloat(uint32_t u) {
  union {
    uint32_t u;
    float f;
  } c;
  c.u = u;
  return c.f;
}

#else

// 512 bits, least significant byte first: the byte order of the word in (little-endian)
// device memory, and so the order `ap_uint::range` numbers its bits.
struct Word512 {
  uint8_t bytes[kWordBytes];
};
static_assert(sizeof(Word512) == kWordBytes);

inline uint32_t GetBits32(const Word512& w, int i) {
  uint32_t v;
  std::memcpy(&v, w.bytes + 4 * i, 4);
  return v;
}
inline uint16_t GetBits16(const Word512& w, int i) {
  uint16_t v;
  std::memcpy(&v, w.bytes + 2 * i, 2);
  return v;
}
inline void SetBits32(Word512& w, int i, uint32_t v) { std::memcpy(w.bytes + 4 * i, &v, 4); }
inline void SetBits16(Word512& w, int i, uint16_t v) { std::memcpy(w.bytes + 2 * i, &v, 2); }
inline uint8_t GetBits8(const Word512& w, int i) { return w.bytes[i]; }
inline void SetBits8(Word512& w, int i, uint8_t v) { w.bytes[i] = v; }

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A FIFO with hls::stream's blocking interface. In C simulation a dataflow region runs its
// processes one after another, so the FIFO is unbounded; reading an empty one is the C-sim
// analogue of a deadlock and throws instead of hanging.
template <typename T>
class Stream {
 public:
  void write(const T& v) { q_.push_back(v); }
  T read() {
    if (empty()) throw std::logic_error("hls_compat::Stream: read from an empty stream");
    T v = q_[head_++];
    if (head_ == q_.size()) {  // drained: reuse the storage from the start
      q_.clear();
      head_ = 0;
    }
    return v;
  }
  bool empty() const { return head_ == q_.size(); }

 private:
  // A vector and a read index rather than std::deque, whose small nodes make the C simulation
  // allocate every few 64-byte words.
  std::vector<T> q_;
  size_t head_ = 0;
};

#endif  // __SYNTHESIS__

}  // namespace mempipe::hls_compat

#endif  // MEMPIPE_FPGA_HLS_HLS_COMPAT_H_
