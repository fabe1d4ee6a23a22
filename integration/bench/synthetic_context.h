// mempipe backend: a synthetic long-context decode workload with realistic key structure.
//
// No model runs here; the benchmark needs caches whose attention behaves like an LLM's, so
// that page selection has something to find. Per layer and KV head:
//   * keys  = channel means m (a few large "outlier" channels, as RoPE'd keys have)
//             + 0.5 * noise;
//   * a few heavy-hitter tokens per (sequence, KV head) (token 0, the attention sink, plus
//     `heavy_hitters` random positions) add 2 * u_h, where u_h is the head's query direction;
//   * queries = u_h + 0.5 * noise, so q.k of a heavy hitter exceeds an ordinary key's by about
//     2 * head_dim: the heavy hitters carry most of the softmax mass, as in real attention;
//   * values are noise.
// Noise is a fast approximate normal (sum of four uniforms, unit variance).
//
//   SyntheticContext ctx(config);
//   MEMPIPE_RETURN_IF_ERROR(ctx.Prefill(progress));          // fills every layer's cache
//   ctx.NextToken(layer, q, k, v);                            // one decode token per sequence
#ifndef MEMPIPE_INTEGRATION_BENCH_SYNTHETIC_CONTEXT_H_
#define MEMPIPE_INTEGRATION_BENCH_SYNTHETIC_CONTEXT_H_

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "core/paged_kv.h"

namespace mempipe {

struct ModelShape {
  int num_layers = 32;
  int num_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
};

struct SyntheticContextConfig {
  ModelShape shape;
  DType dtype = DType::kBFloat16;
  int block_size = 16;
  int batch = 1;
  int context = 32768;     // prompt tokens per sequence (the first sequence's; see ragged)
  bool ragged = false;     // sequence s gets context * (1 - s / (2 * batch)) tokens
  int max_new_tokens = 8;  // room reserved for decoded tokens
  int heavy_hitters = 8;   // per (sequence, KV head), besides the sink token
  uint64_t seed = 1;
  int threads = 2;  // for filling the caches
  // Blocks are handed out in aligned groups of this many consecutive blocks (1, 2, 4 or 8), each
  // group serving consecutive pages of one sequence: the layout super-page digests need
  // (retriever/hierarchical.h). 1: block by block.
  int block_group = 1;
  KvLayout layout = KvLayout::kTokenMajor;  // of every layer's cache (core/paged_kv.h)
};

[[nodiscard]] absl::Status ValidateSyntheticContextConfig(const SyntheticContextConfig& config);

class SyntheticContext {
 public:
  explicit SyntheticContext(const SyntheticContextConfig& config);

  // Allocates and fills every layer's cache for the prompt; `progress(layers_done)` is called
  // as layers complete. Errors: a bad config, or allocation failure (ResourceExhausted).
  [[nodiscard]] absl::Status Prefill(const std::function<void(int)>& progress);

  // Decode token `step` of every sequence at `layer`, in the cache dtype, the same on every
  // call with the same (step, layer):
  //   q [batch, num_heads, head_dim], k and v [batch, num_kv_heads, head_dim].
  // Also fills `slots` [batch] with the token's cache position (after the current lengths);
  // call Advance() once every layer has appended it.
  void NextToken(int step, int layer, std::vector<uint8_t>& q, std::vector<uint8_t>& k,
                 std::vector<uint8_t>& v, std::vector<int64_t>& slots) const;
  // Lengths grow by one token per sequence.
  void Advance();
  // Back to the prompt lengths, so another placement decodes the same tokens.
  void Rewind() { seq_lens_ = prompt_lens_; }

  KvCacheView cache(int layer) { return caches_[layer]; }
  BlockTableView table() const {
    return BlockTableView{block_table_.data(), seq_lens_.data(), config_.batch, max_blocks_};
  }
  // Sequence lengths of the next decode step (the token being decoded included).
  std::vector<int32_t> NextLens() const;
  const SyntheticContextConfig& config() const { return config_; }
  size_t CacheBytesPerLayer() const { return caches_.empty() ? 0 : caches_[0].NumBytes(); }

 private:
  void FillLayer(int layer);
  static float Noise(uint64_t& state);

  SyntheticContextConfig config_;
  int max_blocks_ = 0;
  int num_blocks_ = 0;
  std::vector<int32_t> block_table_;
  std::vector<int32_t> seq_lens_;  // tokens already in the cache
  std::vector<int32_t> prompt_lens_;
  struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<uint8_t[], FreeDeleter>> storage_;
  std::vector<KvCacheView> caches_;
  std::vector<std::vector<float>> directions_;  // [layer][kv_head * head_dim]
  std::vector<std::vector<float>> means_;       // [layer][kv_head * head_dim]
};

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_SYNTHETIC_CONTEXT_H_
