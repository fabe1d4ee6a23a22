#include "fpga/device_layout.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "fpga/hls/kernel_common.h"

namespace mempipe {
namespace {

size_t AlignUp(size_t n) { return (n + kSubBufferAlign - 1) / kSubBufferAlign * kSubBufferAlign; }

}  // namespace

int CuFor(int layer, int kv_head, int num_kv_heads, int num_cus) {
  const int64_t i = static_cast<int64_t>(layer) * num_kv_heads + kv_head;
  return static_cast<int>(((i % num_cus) + num_cus) % num_cus);
}

size_t RowWordsOf(const CacheShape& shape) {
  return static_cast<size_t>(fpga_hls::RowWords(shape.head_dim, static_cast<int>(shape.dtype)));
}

int DigestCode(const CacheShape& shape) {
  return static_cast<int>(shape.dtype) |
         (shape.digest_format == DigestFormat::kInt8 ? fpga_hls::kInt8DigestFlag : 0);
}

size_t HeadSliceWords(const CacheShape& shape) {
  return static_cast<size_t>(shape.num_blocks) *
         fpga_hls::BlockWords(shape.head_dim, DigestCode(shape));
}

size_t ScanWordsOf(const CacheShape& shape) {
  return static_cast<size_t>(fpga_hls::ScanWords(shape.head_dim, DigestCode(shape)));
}

ScoreIo PlanScoreIo(int num_seqs, int group, int head_dim, int max_blocks_per_seq,
                    int max_selected) {
  ScoreIo io;
  io.queries_bytes = static_cast<size_t>(num_seqs) * group * head_dim * sizeof(float);
  io.table_offset = AlignUp(io.queries_bytes);
  io.table_bytes = static_cast<size_t>(num_seqs) * max_blocks_per_seq * sizeof(int32_t);
  io.lens_offset = io.table_offset + AlignUp(io.table_bytes);
  io.lens_bytes = static_cast<size_t>(num_seqs) * sizeof(int32_t);
  io.in_bytes = io.lens_offset + AlignUp(io.lens_bytes);
  io.pages_bytes = static_cast<size_t>(num_seqs) * max_selected * sizeof(int32_t);
  io.counts_offset = AlignUp(io.pages_bytes);
  io.counts_bytes = static_cast<size_t>(num_seqs) * sizeof(int32_t);
  io.out_bytes = io.counts_offset + AlignUp(io.counts_bytes);
  return io;
}

void PackScoreInputs(const SelectRequest& r, int kv_head, int group, const ScoreIo& io,
                     uint8_t* in) {
  float* q = reinterpret_cast<float*>(in + io.queries_offset);
  const int d = r.query.head_dim;
  for (int s = 0; s < r.query.num_seqs; ++s) {
    const size_t src = (static_cast<size_t>(s) * r.query.num_heads + kv_head * group) * d;
    const size_t dst = static_cast<size_t>(s) * group * d;
    for (size_t i = 0; i < static_cast<size_t>(group) * d; ++i) {
      q[dst + i] = LoadAsFloat(r.query.data, r.query.dtype, src + i);
    }
  }
  std::memcpy(in + io.table_offset, r.table.block_table, io.table_bytes);
  std::memcpy(in + io.lens_offset, r.table.seq_lens, io.lens_bytes);
}

void UnpackScoreOutputs(const uint8_t* out, const ScoreIo& io, int kv_head,
                        const SelectionView& sel) {
  const int32_t* pages = reinterpret_cast<const int32_t*>(out + io.pages_offset);
  const int32_t* counts = reinterpret_cast<const int32_t*>(out + io.counts_offset);
  for (int s = 0; s < sel.num_seqs; ++s) {
    std::memcpy(sel.Row(s, kv_head), pages + static_cast<size_t>(s) * sel.max_selected,
                sel.max_selected * sizeof(int32_t));
    sel.Count(s, kv_head) = counts[s];
  }
}

UpdateIo PlanUpdateIo(int num_tokens, const CacheShape& shape) {
  UpdateIo io;
  io.slots_bytes = static_cast<size_t>(num_tokens) * sizeof(int64_t);
  io.keys_offset = AlignUp(io.slots_bytes);
  io.keys_bytes = static_cast<size_t>(num_tokens) * shape.head_dim * DTypeSize(shape.dtype);
  io.in_bytes = io.keys_offset + AlignUp(io.keys_bytes);
  return io;
}

void PackUpdateInputs(const CacheShape& shape, const int64_t* slots, const void* keys, int begin,
                      int end, int kv_head, const UpdateIo& io, uint8_t* in) {
  std::memcpy(in + io.slots_offset, slots + begin, (end - begin) * sizeof(int64_t));
  const size_t row = static_cast<size_t>(shape.head_dim) * DTypeSize(shape.dtype);
  const uint8_t* k = static_cast<const uint8_t*>(keys);
  for (int t = begin; t < end; ++t) {
    std::memcpy(in + io.keys_offset + (t - begin) * row,
                k + (static_cast<size_t>(t) * shape.num_kv_heads + kv_head) * row, row);
  }
}

std::vector<std::pair<int, int>> SplitUpdateLaunches(const int64_t* slots, int num_tokens,
                                                     int block_size) {
  std::vector<std::pair<int, int>> launches;
  std::set<int64_t> closed;  // blocks whose run ended in the current launch
  int64_t current = -1;
  int begin = 0;
  for (int t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0) continue;
    const int64_t block = slots[t] / block_size;
    if (block == current) continue;
    if (closed.count(block)) {
      launches.emplace_back(begin, t);
      begin = t;
      closed.clear();
    } else if (current >= 0) {
      closed.insert(current);
    }
    current = block;
  }
  if (num_tokens > begin) launches.emplace_back(begin, num_tokens);
  return launches;
}

absl::Status GatherKeysForBuild(const KvCacheView& cache, const BlockTableView& table,
                                std::vector<int64_t>& slots, std::vector<uint8_t>& keys) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  const size_t head_bytes = static_cast<size_t>(cache.head_dim) * DTypeSize(cache.dtype);
  const int run = cache.HeadsPerRun();  // a token's KV heads copied in one piece
  slots.clear();
  keys.clear();
  const uint8_t* kv = static_cast<const uint8_t*>(cache.data);
  for (int s = 0; s < table.num_seqs; ++s) {
    const int len = table.seq_lens[s];
    for (int p = 0; p < NumPages(len, cache.block_size); ++p) {
      const int block = table.Block(s, p);
      const int n = std::min(cache.block_size, len - p * cache.block_size);
      for (int t = 0; t < n; ++t) {
        slots.push_back(static_cast<int64_t>(block) * cache.block_size + t);
        for (int h = 0; h < cache.num_kv_heads; h += run) {
          if (cache.KeysTransposed()) {  // run is 1
            keys.resize(keys.size() + head_bytes);
            ReadTransposedKeyRow(cache, kv + cache.Offset(0, block, 0, h) * DTypeSize(cache.dtype),
                                 t, keys.data() + keys.size() - head_bytes);
            continue;
          }
          const uint8_t* src = kv + cache.Offset(0, block, t, h) * DTypeSize(cache.dtype);
          keys.insert(keys.end(), src, src + run * head_bytes);
        }
      }
    }
  }
  return absl::OkStatus();
}

CuLaunch ScoreLaunchWork(const SelectRequest& r, const CacheShape& shape, int cu, const ScoreIo& io,
                         const U55cParams& params) {
  // The RTL kernel (fpga/rtl, measured in simulation: fpga/rtl/cycles.md): the score core takes
  // one (query head, digest word) pair per clock with pages double-buffered; its pipelined adder
  // needs max(group, score_add_stages) slots per word, so a page costs row_words x that
  // (sum aggregation: at least (group - 1) x score_add_stages + 1); the select's emit pass reads
  // every page once and pads the row (n + max_selected clocks) while scoring waits; each row also
  // loads its queries (group x head_dim / 16 words) and pays the fill.
  // Int8 digests (modeled; the RTL core is the native one): the core takes a pair of 64-code
  // words per clock (twice the multipliers of a bf16 word), so a page costs Int8RowWords x
  // the same slots, and the stream reads the record (codes + one scale word) per page.
  CuLaunch l;
  l.cu = cu;
  l.rows = r.table.num_seqs;
  const bool int8 = shape.digest_format == DigestFormat::kInt8;
  const double row_words = int8 ? static_cast<double>(fpga_hls::Int8RowWords(shape.head_dim))
                                : static_cast<double>(RowWordsOf(shape));
  const double scan_words = static_cast<double>(ScanWordsOf(shape));
  const int group = shape.num_kv_heads > 0 ? r.query.num_heads / shape.num_kv_heads : 1;
  const int add_stages = std::max(2, params.score_add_stages);
  double page_clocks = row_words * std::max(group, add_stages);
  if (r.config.aggregation == GroupAggregation::kSum) {  // a head's first sum needs no add
    page_clocks = std::max(page_clocks, (group - 1.0) * add_stages + 1.0);
  }
  page_clocks /= static_cast<double>(params.score_heads_per_clock);
  const double query_words = static_cast<double>(group) * shape.head_dim / 16;
  // A page's pace: the score core or the channel's read rate, whichever is slower. While the
  // select emits a row, the core runs on into the next one until the score FIFO is full.
  const double hz = params.PricedClockHz();
  const double beats_per_clock = std::min(params.hbm_channel_peak_bps * params.hbm_efficiency,
                                          static_cast<double>(params.axi_word_bytes) * hz) /
                                 (params.axi_word_bytes * hz);
  const double page_pace = std::max(page_clocks, scan_words / beats_per_clock);
  double digest_bytes = 0, score = 0, serial = 0;
  for (int s = 0; s < r.table.num_seqs; ++s) {
    const int n = NumPages(r.table.seq_lens[s], shape.block_size);
    digest_bytes += n * scan_words * hls_compat::kWordBytes;
    score += n * page_clocks;
    const double emit = params.select_clocks_per_page * n + r.out.max_selected;
    const double hidden = s + 1 < r.table.num_seqs ? params.score_fifo_pages * page_pace : 0.0;
    serial += std::max(0.0, emit - hidden) + query_words;
  }
  l.hbm_bytes = digest_bytes + io.queries_bytes + io.table_bytes + io.lens_bytes + io.pages_bytes +
                io.counts_bytes;
  l.stream_words = score;
  l.serial_clocks = serial;
  return l;
}

CuLaunch UpdateLaunchWork(const CacheShape& shape, const int64_t* slots, int begin, int end, int cu,
                          const UpdateIo& io) {
  CuLaunch l;
  l.cu = cu;
  l.rows = 1;
  const double row_bytes = static_cast<double>(RowWordsOf(shape)) * hls_compat::kWordBytes;
  // Written per run: both exact rows, plus the int8 record for int8 digests.
  const double out_bytes =
      static_cast<double>(fpga_hls::BlockWords(shape.head_dim, DigestCode(shape))) *
      hls_compat::kWordBytes;
  int64_t current = -1;
  double runs = 0, reads_old = 0;
  for (int t = begin; t < end; ++t) {
    if (slots[t] < 0) continue;
    const int64_t block = slots[t] / shape.block_size;
    if (block != current) {
      ++runs;
      if (slots[t] % shape.block_size != 0) ++reads_old;
      current = block;
    }
  }
  // Keys and slots in, old rows in for runs that continue a page, both rows out per run.
  l.hbm_bytes = io.slots_bytes + io.keys_bytes + 2 * row_bytes * reads_old + out_bytes * runs;
  l.stream_words = (io.keys_bytes + 2 * row_bytes * reads_old) / hls_compat::kWordBytes;
  return l;
}

}  // namespace mempipe
