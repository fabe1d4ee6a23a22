#include "integration/bench/synthetic_context.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <new>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

absl::Status ValidateSyntheticContextConfig(const SyntheticContextConfig& c) {
  const ModelShape& m = c.shape;
  if (m.num_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("layers must be positive, got ", m.num_layers));
  }
  if (m.num_kv_heads <= 0 || m.num_heads <= 0 || m.num_heads % m.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_heads ", m.num_heads,
                                                   " must be a positive multiple of num_kv_heads ",
                                                   m.num_kv_heads));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateHeadDim(m.head_dim));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockSize(c.block_size));
  if (c.batch <= 0)
    return absl::InvalidArgumentError(absl::StrCat("batch must be positive, got ", c.batch));
  if (c.context <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("context must be positive, got ", c.context));
  }
  if (c.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be positive, got ", c.max_new_tokens));
  }
  if (c.block_group != 1 && c.block_group != 2 && c.block_group != 4 && c.block_group != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_group must be 1, 2, 4 or 8, got ", c.block_group));
  }
  if (c.heavy_hitters < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("heavy_hitters must be >= 0, got ", c.heavy_hitters));
  }
  if (c.threads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads must be positive, got ", c.threads));
  }
  return absl::OkStatus();
}

SyntheticContext::SyntheticContext(const SyntheticContextConfig& config) : config_(config) {}

float SyntheticContext::Noise(uint64_t& state) {
  // Sum of four 16-bit uniforms on [0, 1): mean 2, variance 4/12; scaled to unit variance.
  const uint64_t r = SplitMix(state);
  const float sum =
      static_cast<float>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48)) *
      (1.0f / 65536.0f);
  return (sum - 2.0f) * 1.7320508f;
}

absl::Status SyntheticContext::Prefill(const std::function<void(int)>& progress) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSyntheticContextConfig(config_));
  const ModelShape& m = config_.shape;
  seq_lens_.resize(config_.batch);
  for (int s = 0; s < config_.batch; ++s) {
    const double frac = config_.ragged ? 1.0 - static_cast<double>(s) / (2.0 * config_.batch) : 1.0;
    seq_lens_[s] = std::max(1, static_cast<int>(config_.context * frac));
  }
  const int g = config_.block_group;
  max_blocks_ = NumPages(config_.context + config_.max_new_tokens, config_.block_size);
  num_blocks_ = 0;
  for (int s = 0; s < config_.batch; ++s) {
    num_blocks_ +=
        (NumPages(seq_lens_[s] + config_.max_new_tokens, config_.block_size) + g - 1) / g * g;
  }
  // Blocks handed out in an interleaved order, as an allocator serving many requests would, in
  // aligned groups of g blocks.
  block_table_.assign(static_cast<size_t>(config_.batch) * max_blocks_, 0);
  int next = 0;
  for (int p = 0; p < max_blocks_; p += g) {
    for (int s = 0; s < config_.batch; ++s) {
      const int pages = NumPages(seq_lens_[s] + config_.max_new_tokens, config_.block_size);
      if (p >= pages) continue;
      for (int i = 0; i < g && p + i < pages; ++i) {
        block_table_[static_cast<size_t>(s) * max_blocks_ + p + i] = next + i;
      }
      next += g;
    }
  }
  uint64_t seed_state = config_.seed;
  directions_.assign(m.num_layers, {});
  means_.assign(m.num_layers, {});
  for (int l = 0; l < m.num_layers; ++l) {
    directions_[l].resize(static_cast<size_t>(m.num_kv_heads) * m.head_dim);
    means_[l].resize(directions_[l].size());
    for (float& d : directions_[l]) d = Noise(seed_state);
    for (size_t i = 0; i < means_[l].size(); ++i) {
      // One channel in 16 is an outlier with a large mean.
      const bool outlier = (SplitMix(seed_state) & 15) == 0;
      means_[l][i] = (outlier ? 4.0f : 0.3f) * Noise(seed_state);
    }
  }

  storage_.resize(m.num_layers);
  caches_.resize(m.num_layers);
  // Uninitialised, 2 MiB aligned and (where the kernel allows) huge pages: the fill threads
  // touch every page first, so nothing is zeroed twice and page faults stay few.
  constexpr size_t kAlign = size_t{2} << 20;
  for (int l = 0; l < m.num_layers; ++l) {
    caches_[l] = KvCacheView{nullptr,        config_.dtype, num_blocks_,   config_.block_size,
                             m.num_kv_heads, m.head_dim,    config_.layout};
    const size_t bytes = (caches_[l].NumBytes() + kAlign - 1) / kAlign * kAlign;
    storage_[l].reset(static_cast<uint8_t*>(std::aligned_alloc(kAlign, bytes)));
    if (!storage_[l]) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", m.num_layers, " x ", bytes >> 20,
                       " MiB of KV cache; lower --context, --batch or --layers"));
    }
    madvise(storage_[l].get(), bytes, MADV_HUGEPAGE);  // advisory; failure is harmless
    caches_[l].data = storage_[l].get();
  }
  std::atomic<int> next_layer{0}, done{0};
  auto worker = [&] {
    for (int l; (l = next_layer.fetch_add(1)) < m.num_layers;) {
      FillLayer(l);
      done.fetch_add(1);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < config_.threads; ++t) threads.emplace_back(worker);
  int reported = 0;
  while (reported < m.num_layers) {
    const int d = done.load();
    if (d > reported) {
      reported = d;
      if (progress) progress(reported);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  for (auto& t : threads) t.join();
  prompt_lens_ = seq_lens_;
  return absl::OkStatus();
}

void SyntheticContext::FillLayer(int layer) {
  const ModelShape& m = config_.shape;
  const KvCacheView& cache = caches_[layer];
  uint64_t state = config_.seed * 0x1000193ull + static_cast<uint64_t>(layer) * 0x9e3779b9ull;
  const float* dir = directions_[layer].data();
  const float* mean = means_[layer].data();
  const int d = m.head_dim;
  std::vector<float> krow(d), vrow(d);
  DispatchDType(config_.dtype, [&]<typename T>() {
    T* base = static_cast<T*>(cache.data);
    for (int s = 0; s < config_.batch; ++s) {
      // Heavy hitters of this sequence, per KV head: the sink plus random positions.
      std::vector<std::vector<int>> heavy(m.num_kv_heads);
      for (int h = 0; h < m.num_kv_heads; ++h) {
        heavy[h].push_back(0);
        for (int i = 0; i < config_.heavy_hitters; ++i) {
          heavy[h].push_back(static_cast<int>(SplitMix(state) % seq_lens_[s]));
        }
        std::sort(heavy[h].begin(), heavy[h].end());
      }
      for (int t = 0; t < seq_lens_[s]; ++t) {
        const int block = block_table_[static_cast<size_t>(s) * max_blocks_ + t / cache.block_size];
        const int off = t % cache.block_size;
        for (int h = 0; h < m.num_kv_heads; ++h) {
          const bool is_heavy = std::binary_search(heavy[h].begin(), heavy[h].end(), t);
          T* k = base + cache.Offset(0, block, 0, h);  // the page: KeyInPage places the row
          T* v = base + cache.Offset(1, block, off, h);
          for (int c = 0; c < d; ++c) {
            float kv = mean[h * d + c] + 0.5f * Noise(state);
            if (is_heavy) kv += 2.0f * dir[h * d + c];
            k[cache.KeyInPage(off, c)] = FromFloat<T>(kv);
            v[c] = FromFloat<T>(Noise(state));
          }
        }
      }
    }
  });
}

std::vector<int32_t> SyntheticContext::NextLens() const {
  std::vector<int32_t> lens(seq_lens_);
  for (int32_t& l : lens) ++l;
  return lens;
}

void SyntheticContext::NextToken(int step, int layer, std::vector<uint8_t>& q,
                                 std::vector<uint8_t>& k, std::vector<uint8_t>& v,
                                 std::vector<int64_t>& slots) const {
  uint64_t state = config_.seed ^ (static_cast<uint64_t>(step) << 32) ^
                   (static_cast<uint64_t>(layer) * 0x9e3779b97f4a7c15ull);
  const ModelShape& m = config_.shape;
  const int d = m.head_dim;
  const int groups = m.num_heads / m.num_kv_heads;
  const DType dt = config_.dtype;
  q.resize(static_cast<size_t>(config_.batch) * m.num_heads * d * DTypeSize(dt));
  k.resize(static_cast<size_t>(config_.batch) * m.num_kv_heads * d * DTypeSize(dt));
  v.resize(k.size());
  slots.resize(config_.batch);
  const float* dir = directions_[layer].data();
  const float* mean = means_[layer].data();
  for (int s = 0; s < config_.batch; ++s) {
    const int pos = seq_lens_[s];
    const int block = block_table_[static_cast<size_t>(s) * max_blocks_ + pos / config_.block_size];
    slots[s] = static_cast<int64_t>(block) * config_.block_size + pos % config_.block_size;
    for (int h = 0; h < m.num_heads; ++h) {
      const int kvh = h / groups;
      for (int c = 0; c < d; ++c) {
        StoreFromFloat(q.data(), dt, (static_cast<size_t>(s) * m.num_heads + h) * d + c,
                       dir[kvh * d + c] + 0.5f * Noise(state));
      }
    }
    for (int h = 0; h < m.num_kv_heads; ++h) {
      for (int c = 0; c < d; ++c) {
        const size_t i = (static_cast<size_t>(s) * m.num_kv_heads + h) * d + c;
        StoreFromFloat(k.data(), dt, i, mean[h * d + c] + 0.5f * Noise(state));
        StoreFromFloat(v.data(), dt, i, Noise(state));
      }
    }
  }
}

void SyntheticContext::Advance() {
  for (int32_t& l : seq_lens_) ++l;
}

}  // namespace mempipe
