// mempipe fpga: the page-score datapath of the score kernel (HLS; included by kernels only).
//
// The canonical order of retriever/relevancy.h: channel c feeds lane c % 32, each lane adds in
// increasing c, then the adder tree lane[i] += lane[i + s] for s = 16, 8, 4, 2, 1; fp32 products
// and sums, no FMA (the build passes -ffp-contract=off; Vitis HLS keeps separate fmul/fadd
// operators unless told to fuse). Query heads of a group aggregate in head order.
//
//   float s = PageGroupScore(q, mx, mn, group, row_words, dtype, /*aggregation=*/0);
#ifndef MEMPIPE_FPGA_HLS_SCORE_DATAPATH_H_
#define MEMPIPE_FPGA_HLS_SCORE_DATAPATH_H_

#include "fpga/hls/kernel_common.h"
#include "retriever/int8_quant.h"

namespace mempipe::fpga_hls {

// Adder tree lane[i] += lane[i + s], s = 16, 8, 4, 2, 1: the canonical reduction.
inline float LaneTree(float lane[kLanes]) {
#pragma HLS inline
LANE_TREE:
  for (int stride = kLanes / 2; stride > 0; stride /= 2) {
#pragma HLS unroll
    for (int i = 0; i < stride; ++i) {
#pragma HLS unroll
      lane[i] += lane[i + stride];
    }
  }
  return lane[0];
}

// Group score of one page: the Quest bound of each of the `group` query heads
// (q [group][head_dim] fp32) against the page's max and min rows (`row_words` words each, in
// element type kDType), each in the canonical lane order, aggregated in head order (0 = max,
// 1 = sum). The element type is a template parameter so each type gets its own fixed-width
// datapath (and the C simulation its constant-folded decoding).
template <int kDType>
float PageGroupScoreOf(const float q[kMaxGroup][kMaxHeadDim], const Word512 mx[kMaxRowWords],
                       const Word512 mn[kMaxRowWords], int group, int row_words, int aggregation) {
#pragma HLS inline
  const int dtype = kDType;
  const int epw = ElemsPerWord(dtype);
  float agg = 0.0f;
GROUP:
  for (int g = 0; g < group; ++g) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 16
    float lane[kLanes];
#pragma HLS array_partition variable = lane complete
    for (int i = 0; i < kLanes; ++i) lane[i] = 0.0f;
  WORDS:
    for (int w = 0; w < row_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 2 max = 16
    ELEMS:
      for (int e = 0; e < epw; ++e) {
#pragma HLS unroll
        const int c = w * epw + e;
        const float a = q[g][c] * DecodeElem(mx[w], e, dtype);
        const float b = q[g][c] * DecodeElem(mn[w], e, dtype);
        lane[c % kLanes] += a > b ? a : b;
      }
    }
    const float v = LaneTree(lane);
    if (g == 0) {
      agg = v;
    } else if (aggregation == 0) {
      agg = v > agg ? v : agg;
    } else {
      agg += v;
    }
  }
  return agg;
}

// The same on an int8 record: `row_words` words of 64 codes per row; each element dequantized
// with one fp32 multiply by the page's scale (retriever/int8_quant.h), then as above.
inline float PageGroupScoreInt8(const float q[kMaxGroup][kMaxHeadDim],
                                const Word512 mx[kMaxRowWords], const Word512 mn[kMaxRowWords],
                                float scale, int group, int row_words, int aggregation) {
#pragma HLS inline
  constexpr int kEpw = hls_compat::kWordBytes;
  float agg = 0.0f;
GROUP_I8:
  for (int g = 0; g < group; ++g) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 16
    float lane[kLanes];
#pragma HLS array_partition variable = lane complete
    for (int i = 0; i < kLanes; ++i) lane[i] = 0.0f;
  WORDS_I8:
    for (int w = 0; w < row_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 4
    ELEMS_I8:
      for (int e = 0; e < kEpw; ++e) {
#pragma HLS unroll
        const int c = w * kEpw + e;
        const float a = q[g][c] * int8_digest::Dequantize(Int8Elem(mx[w], e), scale);
        const float b = q[g][c] * int8_digest::Dequantize(Int8Elem(mn[w], e), scale);
        lane[c % kLanes] += a > b ? a : b;
      }
    }
    const float v = LaneTree(lane);
    if (g == 0) {
      agg = v;
    } else if (aggregation == 0) {
      agg = v > agg ? v : agg;
    } else {
      agg += v;
    }
  }
  return agg;
}

inline float PageGroupScore(const float q[kMaxGroup][kMaxHeadDim], const Word512 mx[kMaxRowWords],
                            const Word512 mn[kMaxRowWords], int group, int row_words, int dtype,
                            int aggregation) {
#pragma HLS inline
  if (dtype == kDTypeF32) {
    return PageGroupScoreOf<kDTypeF32>(q, mx, mn, group, row_words, aggregation);
  }
  if (dtype == kDTypeF16) {
    return PageGroupScoreOf<kDTypeF16>(q, mx, mn, group, row_words, aggregation);
  }
  return PageGroupScoreOf<kDTypeBF16>(q, mx, mn, group, row_words, aggregation);
}

}  // namespace mempipe::fpga_hls

#endif  // MEMPIPE_FPGA_HLS_SCORE_DATAPATH_H_
