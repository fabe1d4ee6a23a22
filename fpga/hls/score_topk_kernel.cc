// mempipe fpga kernel: relevancy scoring and top-k retrieval for one KV head (steps 2+3).
//
//            HBM pseudo-channel of this CU (two AXI masters)
//   gmem_dg: digests ----------------.        gmem_io: queries, block_table, seq_lens
//                                    v                 |
//   +---------------------------------------------------------+
//   | Load: per sequence: n pages, its query rows, then the   |
//   |       max/min rows of each page via the block table     |  one 512-bit word per clock
//   +---------------------------------------------------------+
//        | q_words            | dg_words             | n
//        v                    v                      v
//   +---------------------------------------------------------+
//   | Score: per page, group x head_dim products, 32-lane     |  page loop II = 2 x row_words
//   |        accumulate, adder tree 16-8-4-2-1, group max/sum |  (one word per clock in)
//   +---------------------------------------------------------+
//        | scores (fp32, one per page)          | n
//        v                                      v
//   +---------------------------------------------------------+
//   | Select: row buffer of scores; insertion array of the    |  II = 1 per page, twice:
//   |         best `want` middle pages; threshold pass emits  |  insert pass, emit pass
//   |         sinks, middle >= threshold, locals (ascending)  |
//   +---------------------------------------------------------+
//        | page ids                             | count
//        v                                      v
//   +---------------------------------------------------------+
//   | Store: pages [num_seqs, max_selected] (-1 padded),      |  II = 1
//   |        counts [num_seqs]                        gmem_io |
//   +---------------------------------------------------------+
//
// Bit-exactness: scores follow retriever/relevancy.h's canonical order (kernel_common.h), and the
// selection is retriever/select.h's: key = score with NaN as -inf, better = higher key, then lower
// page index. The middle set kept is every page at least as good as the want-th best, which is
// exactly the top-`want` set under that strict total order.
#include <limits>

#include "fpga/hls/kernel_common.h"
#include "fpga/hls/kernels.h"
#include "fpga/hls/score_datapath.h"

namespace mempipe::fpga_hls {
namespace {

using hls_compat::Stream;

inline int PagesOf(int len, int block_size) { return (len + block_size - 1) / block_size; }

// NaN ranks last, as in SelectPages.
inline float RankKey(float s) { return s != s ? -std::numeric_limits<float>::infinity() : s; }
inline bool Better(float ka, int a, float kb, int b) { return ka > kb || (ka == kb && a < b); }

void LoadStage(const Word512* digests, const Word512* queries, const int32_t* block_table,
               const int32_t* seq_lens, int num_seqs, int group, int head_dim, int dtype,
               int block_size, int max_blocks_per_seq, Stream<Word512>& q_words,
               Stream<Word512>& dg_words, Stream<int>& n_out) {
  // Int8 digests (kInt8DigestFlag): each block's record, the first ScanWords of BlockWords.
  const int block_words = BlockWords(head_dim, dtype);
  const int scan_words = ScanWords(head_dim, dtype);
  const int q_row_words = QueryRowWords(head_dim);
LOAD_SEQS:
  for (int s = 0; s < num_seqs; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    const int n = PagesOf(seq_lens[s], block_size);
    n_out.write(n);
  LOAD_QUERY:
    for (int i = 0; i < group * q_row_words; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = 256
#pragma HLS pipeline II = 1
      q_words.write(queries[static_cast<int64_t>(s) * group * q_row_words + i]);
    }
  LOAD_PAGES:
    for (int p = 0; p < n; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
      const int64_t base =
          static_cast<int64_t>(block_table[static_cast<int64_t>(s) * max_blocks_per_seq + p]) *
          block_words;
    LOAD_ROWS:
      for (int w = 0; w < scan_words; ++w) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = 32
#pragma HLS pipeline II = 1
        dg_words.write(digests[base + w]);
      }
    }
  }
}

void ScoreStage(int num_seqs, int group, int head_dim, int dtype, int aggregation,
                Stream<Word512>& q_words, Stream<Word512>& dg_words, Stream<int>& n_in,
                Stream<float>& scores, Stream<int>& n_out) {
  const bool int8 = IsInt8Digest(dtype);
  const int row_words = int8 ? Int8RowWords(head_dim) : RowWords(head_dim, dtype);
  const int q_row_words = QueryRowWords(head_dim);
  float q[kMaxGroup][kMaxHeadDim];
#pragma HLS array_partition variable = q complete dim = 2
  Word512 mx[kMaxRowWords];
  Word512 mn[kMaxRowWords];
SCORE_SEQS:
  for (int s = 0; s < num_seqs; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    const int n = n_in.read();
    n_out.write(n);
  SCORE_QUERY:
    for (int i = 0; i < group * q_row_words; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = 256
#pragma HLS pipeline II = 1
      const Word512 w = q_words.read();
      for (int e = 0; e < 16; ++e) {
#pragma HLS unroll
        const int flat = i * 16 + e;
        q[flat / head_dim][flat % head_dim] = hls_compat::BitsToFloat(hls_compat::GetBits32(w, e));
      }
    }
  SCORE_PAGES:
    for (int p = 0; p < n; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
#pragma HLS pipeline
      for (int w = 0; w < row_words; ++w) mx[w] = dg_words.read();
      for (int w = 0; w < row_words; ++w) mn[w] = dg_words.read();
      if (int8) {
        const float scale = hls_compat::BitsToFloat(hls_compat::GetBits32(dg_words.read(), 0));
        scores.write(PageGroupScoreInt8(q, mx, mn, scale, group, row_words, aggregation));
      } else {
        scores.write(PageGroupScore(q, mx, mn, group, row_words, dtype, aggregation));
      }
    }
  }
}

void SelectStage(int num_seqs, int max_blocks_per_seq, int k, int sinks, int locals,
                 Stream<float>& scores, Stream<int>& n_in, Stream<int>& page_ids,
                 Stream<int>& count_out, float* debug_scores) {
  float buf[kMaxPagesPerSeq];
  float top_key[kMaxTopK];
  int top_idx[kMaxTopK];
  bool top_valid[kMaxTopK];
#pragma HLS array_partition variable = top_key complete
#pragma HLS array_partition variable = top_idx complete
#pragma HLS array_partition variable = top_valid complete
SELECT_SEQS:
  for (int s = 0; s < num_seqs; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    const int n = n_in.read();
  SELECT_BUFFER:
    for (int p = 0; p < n; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
#pragma HLS pipeline II = 1
      buf[p] = scores.read();
    }
#ifndef __SYNTHESIS__
    if (debug_scores != nullptr) {
      float* row = debug_scores + static_cast<int64_t>(s) * max_blocks_per_seq;
      for (int p = 0; p < max_blocks_per_seq; ++p) {
        row[p] = p < n ? buf[p] : -std::numeric_limits<float>::infinity();
      }
    }
#endif
    if (n <= k) {
    SELECT_ALL:
      for (int p = 0; p < n; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
#pragma HLS pipeline II = 1
        page_ids.write(p);
      }
      count_out.write(n);
      continue;
    }
    const int lo = sinks;
    const int hi = n - locals;  // middle pages are [lo, hi), more of them than `want`
    const int want = k - sinks - locals;
    for (int i = 0; i < kMaxTopK; ++i) {
#pragma HLS unroll
      top_valid[i] = false;
    }
  SELECT_INSERT:
    for (int p = lo; p < hi; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
#pragma HLS pipeline II = 1
      const float kc = RankKey(buf[p]);
      // Early out: no slot changes unless the candidate beats the current last kept entry.
      if (want == 0 ||
          (top_valid[want - 1] && !Better(kc, p, top_key[want - 1], top_idx[want - 1]))) {
        continue;
      }
      // Every slot decides from the old contents (descending i reads slot i-1 before it is
      // rewritten), so the unrolled hardware does the insertion in one clock.
    SHIFT:
      for (int i = kMaxTopK - 1; i >= 0; --i) {
#pragma HLS unroll
        if (i >= want) continue;
        const bool beats_i = !top_valid[i] || Better(kc, p, top_key[i], top_idx[i]);
        if (!beats_i) continue;
        const bool beats_prev =
            i > 0 && (!top_valid[i - 1] || Better(kc, p, top_key[i - 1], top_idx[i - 1]));
        if (beats_prev) {
          top_key[i] = top_key[i - 1];
          top_idx[i] = top_idx[i - 1];
          top_valid[i] = top_valid[i - 1];
        } else {
          top_key[i] = kc;
          top_idx[i] = p;
          top_valid[i] = true;
        }
      }
    }
  SELECT_SINKS:
    for (int p = 0; p < lo; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 0 max = 16
#pragma HLS pipeline II = 1
      page_ids.write(p);
    }
  SELECT_EMIT:
    for (int p = lo; p < hi; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
#pragma HLS pipeline II = 1
      if (want > 0 && !Better(top_key[want - 1], top_idx[want - 1], RankKey(buf[p]), p)) {
        page_ids.write(p);
      }
    }
  SELECT_LOCALS:
    for (int p = hi; p < n; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 16
#pragma HLS pipeline II = 1
      page_ids.write(p);
    }
    count_out.write(k);
  }
}

void StoreStage(int num_seqs, int max_selected, Stream<int>& page_ids, Stream<int>& count_in,
                int32_t* pages, int32_t* counts) {
STORE_SEQS:
  for (int s = 0; s < num_seqs; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    const int count = count_in.read();
  STORE_PAGES:
    for (int i = 0; i < max_selected; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
#pragma HLS pipeline II = 1
      pages[static_cast<int64_t>(s) * max_selected + i] = i < count ? page_ids.read() : -1;
    }
    counts[s] = count;
  }
}

void ScoreTopkDataflow(const Word512* digests, const Word512* queries, const int32_t* block_table,
                       const int32_t* seq_lens, int32_t* pages, int32_t* counts, int num_seqs,
                       int group, int head_dim, int dtype, int block_size, int max_blocks_per_seq,
                       int max_selected, int k, int sinks, int locals, int aggregation,
                       float* debug_scores) {
#pragma HLS dataflow
  Stream<Word512> q_words;
  Stream<Word512> dg_words;
  Stream<int> n_load;
  Stream<float> scores;
  Stream<int> n_score;
  Stream<int> page_ids;
  Stream<int> count;
#pragma HLS stream variable = dg_words depth = 64
#pragma HLS stream variable = page_ids depth = 1024
  LoadStage(digests, queries, block_table, seq_lens, num_seqs, group, head_dim, dtype, block_size,
            max_blocks_per_seq, q_words, dg_words, n_load);
  ScoreStage(num_seqs, group, head_dim, dtype, aggregation, q_words, dg_words, n_load, scores,
             n_score);
  SelectStage(num_seqs, max_blocks_per_seq, k, sinks, locals, scores, n_score, page_ids, count,
              debug_scores);
  StoreStage(num_seqs, max_selected, page_ids, count, pages, counts);
}

}  // namespace

void ScoreTopkCsim(const Word512* digests, const Word512* queries, const int32_t* block_table,
                   const int32_t* seq_lens, int32_t* pages, int32_t* counts, int num_seqs,
                   int group, int head_dim, int dtype, int block_size, int max_blocks_per_seq,
                   int max_selected, int k, int sinks, int locals, int aggregation, float* scores) {
  ScoreTopkDataflow(digests, queries, block_table, seq_lens, pages, counts, num_seqs, group,
                    head_dim, dtype, block_size, max_blocks_per_seq, max_selected, k, sinks, locals,
                    aggregation, scores);
}

}  // namespace mempipe::fpga_hls

extern "C" void mempipe_score_topk(const mempipe::hls_compat::Word512* digests,
                                   const mempipe::hls_compat::Word512* queries,
                                   const int32_t* block_table, const int32_t* seq_lens,
                                   int32_t* pages, int32_t* counts, int num_seqs, int group,
                                   int head_dim, int dtype, int block_size, int max_blocks_per_seq,
                                   int max_selected, int k, int sinks, int locals,
                                   int aggregation) {
// One AXI master on the head's HBM pseudo-channel for the digest stream, one for everything else
// (same pseudo-channel, see fpga/hls/u55c_connectivity.cfg).
#pragma HLS interface m_axi port = digests bundle = gmem_dg offset = slave max_read_burst_length = \
    64 num_read_outstanding = 32
#pragma HLS interface m_axi port = queries bundle = gmem_io offset = slave
#pragma HLS interface m_axi port = block_table bundle = gmem_io offset = slave
#pragma HLS interface m_axi port = seq_lens bundle = gmem_io offset = slave
#pragma HLS interface m_axi port = pages bundle = gmem_io offset = slave
#pragma HLS interface m_axi port = counts bundle = gmem_io offset = slave
#pragma HLS interface s_axilite port = return
  mempipe::fpga_hls::ScoreTopkDataflow(
      digests, queries, block_table, seq_lens, pages, counts, num_seqs, group, head_dim, dtype,
      block_size, max_blocks_per_seq, max_selected, k, sinks, locals, aggregation, nullptr);
}
