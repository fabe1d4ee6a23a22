// mempipe fpga kernel: incremental page-digest update for one KV head (step 1, "prepare").
//
//   gmem_key: slots, keys          gmem_dg_in: digests (old rows of runs not starting a page)
//        |                               |
//        v                               v
//   +------------------------------------------------------------+
//   | Load: walk the slots in append order; at each new block     |  one 512-bit word
//   |       emit a run header (and the block's old max/min rows   |  per clock
//   |       unless its first token opens the page); per token     |
//   |       emit this head's key row                              |
//   +------------------------------------------------------------+
//        | ctrl (begin/token/end/done)      | words
//        v                                  v
//   +------------------------------------------------------------+
//   | Fold: row registers for max and min; a token at offset 0    |  II = 1 per word
//   |       resets them to its key, any other widens them         |
//   |       element-wise (compare in fp32, keep the stored bits)  |
//   +------------------------------------------------------------+
//        | block id + 2 x row_words words per finished run
//        v
//   +------------------------------------------------------------+
//   | Store: write the run's max and min rows           gmem_dg_out |  II = 1
//   +------------------------------------------------------------+
//
// Same result as retriever/digest.h UpdateDigestsFromKeys bit for bit: max/min pick stored
// values, never round. Int8 digests: the fold runs on the exact rows, and at each run's end the
// record (codes + scale) is re-quantized from them with retriever/int8_quant.h's functions, the
// CPU reference's own code. The host splits a launch wherever a block would reappear after its run
// ended, so a load never reads a row the store has yet to write.
#include "fpga/hls/kernel_common.h"
#include "fpga/hls/kernels.h"
#include "retriever/int8_quant.h"

namespace mempipe::fpga_hls {
namespace {

using hls_compat::Stream;

enum CtrlOp : int { kBegin = 0, kToken = 1, kEnd = 2, kDone = 3 };
struct Ctrl {
  int op;
  int block;
  bool flag;  // kBegin: old rows follow; kToken: the token opens its page (reset)
};

void LoadStage(const Word512* digests_in, const Word512* keys, const int64_t* slots, int num_tokens,
               int num_kv_heads, int head, int row_words, int block_words, int exact_offset,
               int block_size, Stream<Ctrl>& ctrl, Stream<Word512>& words) {
  int current = -1;
LOAD_TOKENS:
  for (int t = 0; t < num_tokens; ++t) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int block = static_cast<int>(slot / block_size);
    const bool opens_page = slot % block_size == 0;
    if (block != current) {
      if (current >= 0) ctrl.write(Ctrl{kEnd, current, false});
      ctrl.write(Ctrl{kBegin, block, !opens_page});
      if (!opens_page) {
      LOAD_OLD:
        for (int w = 0; w < 2 * row_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = 32
#pragma HLS pipeline II = 1
          words.write(digests_in[static_cast<int64_t>(block) * block_words + exact_offset + w]);
        }
      }
      current = block;
    }
    ctrl.write(Ctrl{kToken, block, opens_page});
    const int64_t key_base = (static_cast<int64_t>(t) * num_kv_heads + head) * row_words;
  LOAD_KEY:
    for (int w = 0; w < row_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 2 max = 16
#pragma HLS pipeline II = 1
      words.write(keys[key_base + w]);
    }
  }
  if (current >= 0) ctrl.write(Ctrl{kEnd, current, false});
  ctrl.write(Ctrl{kDone, -1, false});
}

// Widens one word of the max and min rows by a key word: compare in fp32, keep the stored bits.
// One instance per element type, so each has a fixed number of lanes.
template <int kDType>
void WidenWord(const Word512& key, Word512& mx, Word512& mn) {
#pragma HLS inline
FOLD_ELEMS:
  for (int e = 0; e < ElemsPerWord(kDType); ++e) {
#pragma HLS unroll
    const float k = DecodeElem(key, e, kDType);
    if (k > DecodeElem(mx, e, kDType)) CopyElem(key, mx, e, kDType);
    if (k < DecodeElem(mn, e, kDType)) CopyElem(key, mn, e, kDType);
  }
}

// Int8 digests: the record of the exact rows mx/mn (retriever/int8_quant.h's QuantizeRows).
void EmitInt8Record(const Word512 mx[kMaxRowWords], const Word512 mn[kMaxRowWords], int row_words,
                    int dtype, int head_dim, Stream<Word512>& out_words) {
  float fmx[kMaxHeadDim], fmn[kMaxHeadDim];
  int8_t qmx[kMaxHeadDim], qmn[kMaxHeadDim];
  const int epw = ElemsPerWord(dtype);
  for (int w = 0; w < row_words; ++w) {
    for (int e = 0; e < epw; ++e) {
      fmx[w * epw + e] = DecodeElem(mx[w], e, dtype);
      fmn[w * epw + e] = DecodeElem(mn[w], e, dtype);
    }
  }
  const float scale = int8_digest::QuantizeRows(fmx, fmn, head_dim, qmx, qmn);
  const int rw8 = Int8RowWords(head_dim);
  for (int row = 0; row < 2; ++row) {
    const int8_t* q = row == 0 ? qmx : qmn;
    for (int w = 0; w < rw8; ++w) {
      Word512 word{};
      for (int e = 0; e < hls_compat::kWordBytes; ++e) {
        hls_compat::SetBits8(word, e, static_cast<uint8_t>(q[w * hls_compat::kWordBytes + e]));
      }
      out_words.write(word);
    }
  }
  Word512 sw{};
  hls_compat::SetBits32(sw, 0, int8_digest::Bits(scale));
  out_words.write(sw);
}

void FoldStage(int row_words, int dtype, bool int8, int head_dim, Stream<Ctrl>& ctrl,
               Stream<Word512>& words, Stream<int>& out_block, Stream<Word512>& out_words) {
  Word512 mx[kMaxRowWords];
  Word512 mn[kMaxRowWords];
FOLD_CTRL:
  for (;;) {
#pragma HLS LOOP_TRIPCOUNT min = 3 max = 65536
    const Ctrl c = ctrl.read();
    if (c.op == kDone) break;
    if (c.op == kBegin) {
      if (c.flag) {
        for (int w = 0; w < row_words; ++w) mx[w] = words.read();
        for (int w = 0; w < row_words; ++w) mn[w] = words.read();
      }
    } else if (c.op == kToken) {
    FOLD_KEY:
      for (int w = 0; w < row_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 2 max = 16
#pragma HLS pipeline II = 1
        const Word512 key = words.read();
        if (c.flag) {
          mx[w] = key;
          mn[w] = key;
          continue;
        }
        if (dtype == kDTypeF32) {
          WidenWord<kDTypeF32>(key, mx[w], mn[w]);
        } else if (dtype == kDTypeF16) {
          WidenWord<kDTypeF16>(key, mx[w], mn[w]);
        } else {
          WidenWord<kDTypeBF16>(key, mx[w], mn[w]);
        }
      }
    } else {  // kEnd
      out_block.write(c.block);
      if (int8) EmitInt8Record(mx, mn, row_words, dtype, head_dim, out_words);
      for (int w = 0; w < row_words; ++w) out_words.write(mx[w]);
      for (int w = 0; w < row_words; ++w) out_words.write(mn[w]);
    }
  }
  out_block.write(-1);
}

void StoreStage(int block_words, Stream<int>& in_block, Stream<Word512>& in_words,
                Word512* digests_out) {
STORE_RUNS:
  for (;;) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
    const int block = in_block.read();
    if (block < 0) break;
  STORE_ROWS:
    for (int w = 0; w < block_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = 41
#pragma HLS pipeline II = 1
      digests_out[static_cast<int64_t>(block) * block_words + w] = in_words.read();
    }
  }
}

}  // namespace
}  // namespace mempipe::fpga_hls

extern "C" void mempipe_digest_update(const mempipe::hls_compat::Word512* digests_in,
                                      mempipe::hls_compat::Word512* digests_out,
                                      const mempipe::hls_compat::Word512* keys,
                                      const int64_t* slots, int num_tokens, int num_kv_heads,
                                      int head, int head_dim, int dtype, int block_size) {
#pragma HLS interface m_axi port = digests_in bundle = gmem_dg_in offset = slave
#pragma HLS interface m_axi port = digests_out bundle = gmem_dg_out offset = slave
#pragma HLS interface m_axi port = keys bundle = gmem_key offset = slave
#pragma HLS interface m_axi port = slots bundle = gmem_key offset = slave
#pragma HLS interface s_axilite port = return
#pragma HLS dataflow
  using mempipe::fpga_hls::Ctrl;
  using mempipe::hls_compat::Stream;
  using mempipe::hls_compat::Word512;
  // dtype: the cache dtype, plus kInt8DigestFlag for int8 digests (kernel_common.h).
  const bool int8 = mempipe::fpga_hls::IsInt8Digest(dtype);
  const int key_dtype = mempipe::fpga_hls::CacheDTypeOf(dtype);
  const int row_words = mempipe::fpga_hls::RowWords(head_dim, key_dtype);
  const int block_words = mempipe::fpga_hls::BlockWords(head_dim, dtype);
  const int exact_offset = int8 ? mempipe::fpga_hls::Int8RecordWords(head_dim) : 0;
  Stream<Ctrl> ctrl;
  Stream<Word512> words;
  Stream<int> run_block;
  Stream<Word512> run_words;
#pragma HLS stream variable = words depth = 64
#pragma HLS stream variable = run_words depth = 64
  mempipe::fpga_hls::LoadStage(digests_in, keys, slots, num_tokens, num_kv_heads, head, row_words,
                               block_words, exact_offset, block_size, ctrl, words);
  mempipe::fpga_hls::FoldStage(row_words, key_dtype, int8, head_dim, ctrl, words, run_block,
                               run_words);
  mempipe::fpga_hls::StoreStage(block_words, run_block, run_words, digests_out);
}
