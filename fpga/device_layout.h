// mempipe fpga: how the page selector's data sit on the card, shared by every FPGA device.
//
// Placement. The xclbin holds `num_cus` compute units of each kernel, CU i wired to HBM
// pseudo-channel i (fpga/hls/u55c_connectivity.cfg). The digests of (layer, KV head) live in one
// slice [num_blocks, 2, row_words] words on pseudo-channel CuFor(layer, head), and every launch
// for that head runs on that channel's CU; a request's KV heads thus run on different CUs in
// parallel, and consecutive layers land on further channels.
//
// Per launch, one input buffer and one output buffer per CU, each split into sub-buffers (one per
// kernel argument) at 4 KiB boundaries, so a step costs one DMA each way per CU:
//   score  in:  queries [num_seqs, group, head_dim] fp32 | block_table | seq_lens
//          out: pages [num_seqs, max_selected] int32 | counts [num_seqs] int32
//   update in:  slots [n] int64 | keys [n, 1, head_dim] cache dtype (this head's rows only)
//
//   ScoreIo io = PlanScoreIo(num_seqs, group, head_dim, max_blocks_per_seq, max_selected);
//   PackScoreInputs(request, head, group, io, in_bytes);
//   ...launch...
//   UnpackScoreOutputs(out_bytes, io, head, request.out);
#ifndef MEMPIPE_FPGA_DEVICE_LAYOUT_H_
#define MEMPIPE_FPGA_DEVICE_LAYOUT_H_

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "fpga/emulation/u55c_model.h"
#include "retriever/page_selector.h"

namespace mempipe {

inline constexpr size_t kSubBufferAlign = 4096;

// Compute unit (= HBM pseudo-channel) holding the digests of (layer, kv_head).
int CuFor(int layer, int kv_head, int num_kv_heads, int num_cus);

// The kernels' `dtype` argument for this layer: the cache dtype, plus
// fpga_hls::kInt8DigestFlag when shape.digest_format is kInt8 (fpga/hls/kernel_common.h).
int DigestCode(const CacheShape& shape);

// Words of one head's digest slice: num_blocks x BlockWords (2 rows x row_words natively; the
// int8 record plus the exact rows for int8 digests, fpga/hls/kernel_common.h).
size_t HeadSliceWords(const CacheShape& shape);
size_t RowWordsOf(const CacheShape& shape);  // words of one exact (cache dtype) row
// Words a score pass reads per page and KV head: 2 x row_words, or the int8 record.
size_t ScanWordsOf(const CacheShape& shape);

struct ScoreIo {
  size_t queries_offset = 0, queries_bytes = 0;
  size_t table_offset = 0, table_bytes = 0;
  size_t lens_offset = 0, lens_bytes = 0;
  size_t in_bytes = 0;
  size_t pages_offset = 0, pages_bytes = 0;
  size_t counts_offset = 0, counts_bytes = 0;
  size_t out_bytes = 0;
};
ScoreIo PlanScoreIo(int num_seqs, int group, int head_dim, int max_blocks_per_seq,
                    int max_selected);
// Writes the group's queries (as fp32), the block table and the lengths into `in` [io.in_bytes].
void PackScoreInputs(const SelectRequest& request, int kv_head, int group, const ScoreIo& io,
                     uint8_t* in);
// Copies one head's pages and counts from `out` [io.out_bytes] into the request's selection.
void UnpackScoreOutputs(const uint8_t* out, const ScoreIo& io, int kv_head,
                        const SelectionView& selection);

struct UpdateIo {
  size_t slots_offset = 0, slots_bytes = 0;
  size_t keys_offset = 0, keys_bytes = 0;
  size_t in_bytes = 0;
};
UpdateIo PlanUpdateIo(int num_tokens, const CacheShape& shape);
// Writes slots [begin, end) and this head's key rows of those tokens into `in`.
//   keys [num_tokens_total, num_kv_heads, head_dim] cache dtype
void PackUpdateInputs(const CacheShape& shape, const int64_t* slots, const void* keys, int begin,
                      int end, int kv_head, const UpdateIo& io, uint8_t* in);

// Splits tokens [0, num_tokens) into launches [begin, end) such that within each, every
// block's tokens are contiguous (the digest kernel's no-read-after-write rule).
std::vector<std::pair<int, int>> SplitUpdateLaunches(const int64_t* slots, int num_tokens,
                                                     int block_size);

// The bulk build as an update: slots and key rows [n, num_kv_heads, head_dim] of every token of
// every page `table` uses, page by page in token order. Validates cache and table.
[[nodiscard]] absl::Status GatherKeysForBuild(const KvCacheView& cache, const BlockTableView& table,
                                              std::vector<int64_t>& slots,
                                              std::vector<uint8_t>& keys);

// Modeled work of one score launch / one update launch on compute unit `cu`.
// The score launch follows the RTL kernel's timing (fpga/rtl), priced with `params`.
CuLaunch ScoreLaunchWork(const SelectRequest& request, const CacheShape& shape, int cu,
                         const ScoreIo& io, const U55cParams& params = U55cParams{});
CuLaunch UpdateLaunchWork(const CacheShape& shape, const int64_t* slots, int begin, int end, int cu,
                          const UpdateIo& io);

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_DEVICE_LAYOUT_H_
