// libFuzzer target: relevancy and selection (retriever/relevancy.h, retriever/select.h).
//
// Oracles: every selection SelectPages or ScoreAndSelect returns passes ValidateSelection (the
// check the pipeline applies to a selection from another device), and its middle pages are the
// top-scoring ones (no unselected middle page scores higher than a selected one, NaN last).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"
#include "tests/fuzz/fuzz_input.h"

namespace mempipe::fuzz {
namespace {

float Key(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

void Run(FuzzedDataProvider& in) {
  const int block_size = in.PickValueInArray(kSupportedBlockSizes);
  SelectionConfig config;
  config.budget_tokens = in.ConsumeIntegralInRange<int>(0, 15) == 0
                             ? in.ConsumeIntegral<int>()
                             : block_size * in.ConsumeIntegralInRange<int>(1, 8);
  config.num_sink_pages = SmallInt(in, 0, 3);
  config.num_local_pages = SmallInt(in, 0, 3);
  config.aggregation = static_cast<GroupAggregation>(in.ConsumeIntegralInRange<int>(0, 2));
  const int num_seqs = in.ConsumeIntegralInRange<int>(1, 3);
  const int kv = in.ConsumeIntegralInRange<int>(1, 2);
  const int width = in.ConsumeIntegralInRange<int>(1, 24);
  const int num_blocks = in.ConsumeIntegralInRange<int>(1, 24);
  FuzzTable t = FuzzTable::Make(in, num_seqs, width, block_size, num_blocks);
  const int k = config.budget_tokens > 0 ? config.PagesPerHead(block_size) : 0;
  // A huge budget gets rows too short for it (the call must refuse them), not a huge buffer.
  const int max_selected = std::min(std::max(k, 0), 64) + in.ConsumeIntegralInRange<int>(0, 2);
  std::vector<int32_t> pages(static_cast<size_t>(num_seqs) * kv * std::max(max_selected, 1), -7);
  std::vector<int32_t> counts(static_cast<size_t>(num_seqs) * kv, -7);
  const SelectionView out{pages.data(), counts.data(), num_seqs, kv, max_selected};

  if (in.ConsumeBool()) {
    std::vector<float> scores(static_cast<size_t>(num_seqs) * kv * width);
    for (float& s : scores) s = AnyFloat(in);
    if (SelectPages(scores.data(), t.view, block_size, kv, config, out).ok()) {
      if (!ValidateSelection(out, t.view, block_size, config).ok()) std::abort();
      for (int s = 0; s < num_seqs; ++s) {
        const int n = NumPages(t.lens[s], block_size);
        if (n <= k) continue;
        for (int h = 0; h < kv; ++h) {
          const float* sc = scores.data() + (static_cast<size_t>(s) * kv + h) * width;
          std::vector<bool> chosen(n, false);
          for (int i = 0; i < out.Count(s, h); ++i) chosen[out.Row(s, h)[i]] = true;
          float worst_chosen = std::numeric_limits<float>::infinity();
          float best_left = -std::numeric_limits<float>::infinity();
          for (int p = config.num_sink_pages; p < n - config.num_local_pages; ++p) {
            if (chosen[p])
              worst_chosen = std::min(worst_chosen, Key(sc[p]));
            else
              best_left = std::max(best_left, Key(sc[p]));
          }
          if (best_left > worst_chosen) std::abort();
        }
      }
    }
    return;
  }
  FuzzCache c;
  c.view = KvCacheView{nullptr, AnyDType(in), num_blocks, block_size, kv, 64};
  c.bytes.resize(c.view.NumBytes());
  c.view.data = c.bytes.data();
  for (size_t i = 0; i < c.view.NumElems(); i += 61) {
    StoreFromFloat(c.view.data, c.view.dtype, i, AnyFloat(in));
  }
  DigestView d{nullptr, c.view.dtype, num_blocks, kv, 64};
  std::vector<uint8_t> dbytes(d.NumBytes());
  d.data = dbytes.data();
  (void)BuildDigests(c.view, t.view, d);
  const int heads = kv * in.ConsumeIntegralInRange<int>(1, 3);
  std::vector<uint8_t> q(static_cast<size_t>(num_seqs) * heads * 64 * DTypeSize(c.view.dtype));
  for (size_t i = 0; i < q.size() / DTypeSize(c.view.dtype); ++i) {
    StoreFromFloat(q.data(), c.view.dtype, i, in.ConsumeFloatingPointInRange<float>(-2.f, 2.f));
  }
  const QueryView query{q.data(), c.view.dtype, num_seqs, heads, 64};
  if (ScoreAndSelect(query, c.view, d, t.view, config, out).ok()) {
    if (!ValidateSelection(out, t.view, block_size, config).ok()) std::abort();
  }
}

}  // namespace
}  // namespace mempipe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  mempipe::fuzz::Run(in);
  return 0;
}
