// mempipe fpga: the HLS kernels' top functions and their argument lists.
//
// Each launch works on ONE KV head of one layer, batched over the sequences of a request; the
// host launches one compute unit per KV head (fpga/device_layout.h says which CU and HBM
// pseudo-channel hold which head). The argument tables below are the single source for the
// host runtime (argument indices) and for the xclbin the project writes (kernel metadata), so the
// three cannot drift apart.
//
//   mempipe_score_topk(digests, queries, table, lens, pages, counts, num_seqs, group, head_dim,
//                      dtype, block_size, max_blocks_per_seq, max_selected, k, sinks, locals,
//                      aggregation);
#ifndef MEMPIPE_FPGA_HLS_KERNELS_H_
#define MEMPIPE_FPGA_HLS_KERNELS_H_

#include <cstdint>

#include "fpga/hls/hls_compat.h"

extern "C" {

// Steps 2+3 for one KV head: Quest scores of every page of every sequence, then the selection of
// retriever/select.h (sinks + locals kept, top middle pages by score desc / index asc, ascending).
//   digests     [num_blocks, 2, row_words] words: this head's max row then min row, cache dtype;
//               with int8 digests (dtype | kInt8DigestFlag) [num_blocks, BlockWords] words,
//               of which each page's record is read (kernel_common.h)
//   queries     [num_seqs, group, head_dim] fp32: the query heads of this KV head's group
//   block_table [num_seqs, max_blocks_per_seq] int32 physical block ids
//   seq_lens    [num_seqs] int32, 1 <= len <= max_blocks_per_seq * block_size
//   pages       [num_seqs, max_selected] int32 logical page ids, ascending, -1 padded
//   counts      [num_seqs] int32
//   k = budget pages per row; sinks/locals as SelectionConfig; aggregation 0 max, 1 sum
void mempipe_score_topk(const mempipe::hls_compat::Word512* digests,
                        const mempipe::hls_compat::Word512* queries, const int32_t* block_table,
                        const int32_t* seq_lens, int32_t* pages, int32_t* counts, int num_seqs,
                        int group, int head_dim, int dtype, int block_size, int max_blocks_per_seq,
                        int max_selected, int k, int sinks, int locals, int aggregation);

// Step 1, incremental, for one KV head: the digest update of retriever/digest.h
// (UpdateDigestsFromKeys). `digests_in` and `digests_out` are the same buffer, read by the load
// stage and written by the store stage; the host guarantees that within one launch every block's
// tokens form one contiguous run, so no read of a block follows a write to it.
//   digests_in/_out [num_blocks, 2, row_words] words, this head's slice, cache dtype; with int8
//                   digests (dtype | kInt8DigestFlag) [num_blocks, BlockWords]: the exact rows
//                   are folded as above and each run's record re-quantized from them
//   keys            [num_tokens, num_kv_heads, head_dim] cache dtype (row `head` is read)
//   slots           [num_tokens] int64 block * block_size + offset; negative entries skipped
void mempipe_digest_update(const mempipe::hls_compat::Word512* digests_in,
                           mempipe::hls_compat::Word512* digests_out,
                           const mempipe::hls_compat::Word512* keys, const int64_t* slots,
                           int num_tokens, int num_kv_heads, int head, int head_dim, int dtype,
                           int block_size);

}  // extern "C"

namespace mempipe::fpga_hls {

// C-simulation entry of mempipe_score_topk that also records every page's score
// (scores [num_seqs, max_blocks_per_seq] fp32, -inf past a sequence's pages), so tests can
// compare the kernel's scores with the CPU reference bit for bit. Not synthesized.
void ScoreTopkCsim(const hls_compat::Word512* digests, const hls_compat::Word512* queries,
                   const int32_t* block_table, const int32_t* seq_lens, int32_t* pages,
                   int32_t* counts, int num_seqs, int group, int head_dim, int dtype,
                   int block_size, int max_blocks_per_seq, int max_selected, int k, int sinks,
                   int locals, int aggregation, float* scores);

// Kernel argument descriptions for the host runtime and the xclbin metadata.
enum class ArgKind { kGlobal, kScalar };
struct KernelArg {
  const char* name;
  ArgKind kind;
  int size;          // bytes on the control interface: 8 for a pointer, 4 for an int
  const char* type;  // the C type, as the xclbin metadata spells it
};

inline constexpr KernelArg kScoreTopkArgs[] = {
    {"digests", ArgKind::kGlobal, 8, "ap_uint<512>*"},
    {"queries", ArgKind::kGlobal, 8, "ap_uint<512>*"},
    {"block_table", ArgKind::kGlobal, 8, "int*"},
    {"seq_lens", ArgKind::kGlobal, 8, "int*"},
    {"pages", ArgKind::kGlobal, 8, "int*"},
    {"counts", ArgKind::kGlobal, 8, "int*"},
    {"num_seqs", ArgKind::kScalar, 4, "int"},
    {"group", ArgKind::kScalar, 4, "int"},
    {"head_dim", ArgKind::kScalar, 4, "int"},
    {"dtype", ArgKind::kScalar, 4, "int"},
    {"block_size", ArgKind::kScalar, 4, "int"},
    {"max_blocks_per_seq", ArgKind::kScalar, 4, "int"},
    {"max_selected", ArgKind::kScalar, 4, "int"},
    {"k", ArgKind::kScalar, 4, "int"},
    {"sinks", ArgKind::kScalar, 4, "int"},
    {"locals", ArgKind::kScalar, 4, "int"},
    {"aggregation", ArgKind::kScalar, 4, "int"},
};

inline constexpr KernelArg kDigestUpdateArgs[] = {
    {"digests_in", ArgKind::kGlobal, 8, "ap_uint<512>*"},
    {"digests_out", ArgKind::kGlobal, 8, "ap_uint<512>*"},
    {"keys", ArgKind::kGlobal, 8, "ap_uint<512>*"},
    {"slots", ArgKind::kGlobal, 8, "long*"},
    {"num_tokens", ArgKind::kScalar, 4, "int"},
    {"num_kv_heads", ArgKind::kScalar, 4, "int"},
    {"head", ArgKind::kScalar, 4, "int"},
    {"head_dim", ArgKind::kScalar, 4, "int"},
    {"dtype", ArgKind::kScalar, 4, "int"},
    {"block_size", ArgKind::kScalar, 4, "int"},
};

inline constexpr char kScoreTopkName[] = "mempipe_score_topk";
inline constexpr char kDigestUpdateName[] = "mempipe_digest_update";

}  // namespace mempipe::fpga_hls

#endif  // MEMPIPE_FPGA_HLS_KERNELS_H_
