// Step 4 on an ApplyDevice (backend/apply_device.h) on fresh random data (seed printed): the
// device alone (dense and sparse decode, a token synced after the upload) and the stage pipeline
// with it (placements dense and cpu-selection + device apply), each output row against the
// float64 reference over the tokens it attends, outputs NaN-poisoned. Each check is shown to
// reject a known-wrong answer (a stale device copy; a reference with the wrong scale).
// Built twice: against the GPU (backend/gpu/gpu_apply_device.h; without a GPU every test skips,
// MEMPIPE_REQUIRE_GPU=1 makes that a failure) and, with MEMPIPE_TEST_HOST_APPLY_DEVICE, against
// the host-copy double (tests/testing/host_apply_device.h) on every CI machine.
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention/decode.h"
#include "backend/decode_pipeline.h"
#include "gtest/gtest.h"
#include "retriever/page_selector.h"
#include "tests/testing/paged_fixture.h"
#if defined(MEMPIPE_TEST_HOST_APPLY_DEVICE)
#include "tests/testing/host_apply_device.h"
#else
#include "backend/gpu/gpu_apply_device.h"
#include "core/gpu/gpu_runtime.h"
#include "tests/testing/gpu_test_util.h"
#endif

namespace mempipe {
namespace {

using testing::FixtureSpec;
using testing::GpuAttentionTolerance;
using testing::PagedFixture;
using testing::RandomTensor;
using testing::ReferenceAttention;
using testing::TestSeed;

#if defined(MEMPIPE_TEST_HOST_APPLY_DEVICE)
using TestDevice = testing::HostApplyDevice;
#define SKIP_WITHOUT_GPU() \
  do {                     \
  } while (0)
#else
using TestDevice = GpuApplyDevice;

#define SKIP_WITHOUT_GPU() MEMPIPE_SKIP_WITHOUT_GPU("GPU apply test")
#endif

constexpr int kKvHeads = 2;
constexpr int kGroup = 4;
constexpr int kHeads = kKvHeads * kGroup;
constexpr int kHeadDim = 128;
constexpr DType kDtype = DType::kBFloat16;

std::vector<uint8_t> NanBytes(size_t n) {
  std::vector<uint8_t> v(n * DTypeSize(kDtype));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(v.data(), kDtype, i, NAN);
  return v;
}

// Re-poisons `v` in place (a DecodeIo holds its address).
void Poison(std::vector<uint8_t>& v) {
  for (size_t i = 0; i < v.size() / DTypeSize(kDtype); ++i)
    StoreFromFloat(v.data(), kDtype, i, NAN);
}

// Largest |out - reference| / bound over every (sequence, head, channel), the bound derived from
// the dtype's rounding and the row's reduction length (testing::AttentionTolerance): <= 1 passes.
// `tokens(s, kvh)` lists what the row attends. NaN counts as infinite.
template <typename TokensOf>
double MaxError(const PagedFixture& f, const RandomTensor& q, const std::vector<uint8_t>& out,
                double scale, TokensOf tokens) {
  double worst = 0;
  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int h = 0; h < kHeads; ++h) {
      const size_t row = (static_cast<size_t>(s) * kHeads + h) * kHeadDim;
      const std::vector<int> attended = tokens(s, h / kGroup);
      const auto ref = ReferenceAttention(f, &q.values[row], s, h / kGroup, attended, scale);
      for (int c = 0; c < kHeadDim; ++c) {
        const double got = LoadAsFloat(out.data(), kDtype, row + c);
        const double bound =
            GpuAttentionTolerance(kDtype, ref[c], static_cast<int>(attended.size()), kHeadDim);
        const double e = std::isnan(got) ? INFINITY : std::fabs(got - ref[c]) / bound;
        worst = std::max(worst, e);
      }
    }
  }
  return worst;
}

std::vector<int> AllTokens(const PagedFixture& f, int s) {
  std::vector<int> t(f.table_view().seq_lens[s]);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int>(i);
  return t;
}

std::vector<int> PageTokens(const PagedFixture& f, int s, const int32_t* pages, int count) {
  std::vector<int> t;
  const int bs = f.spec().block_size;
  const int len = f.table_view().seq_lens[s];
  for (int i = 0; i < count; ++i) {
    for (int k = pages[i] * bs; k < std::min(len, (pages[i] + 1) * bs); ++k) t.push_back(k);
  }
  return t;
}

TEST(ApplyDevice, DenseAndSparseMatchFloat64AndSyncTokens) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  FixtureSpec spec;
  spec.dtype = kDtype;
  spec.num_kv_heads = kKvHeads;
  spec.head_dim = kHeadDim;
  spec.seq_lens = {37, 200, 16, 129};  // partial last pages, shuffled blocks
  PagedFixture f(rng, spec);
  const BlockTableView table = f.table_view();
  RandomTensor q(rng, kDtype, static_cast<size_t>(f.num_seqs()) * kHeads * kHeadDim);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  const double tol = 1.0;  // MaxError is in units of the derived bound

  absl::StatusOr<std::unique_ptr<TestDevice>> dev = TestDevice::Create();
  ASSERT_TRUE(dev.ok()) << dev.status();
  ASSERT_TRUE((*dev)->AddLayer(3, f.cache_view()).ok());
  std::vector<uint8_t> out = NanBytes(q.values.size());
  const DecodeIo io{q.data(), out.data(), kDtype, f.num_seqs(), kHeads, kHeadDim};
  auto all = [&](int s, int) { return AllTokens(f, s); };

  absl::Status st = (*dev)->Decode(3, io, table, nullptr, static_cast<float>(scale));
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LE(MaxError(f, q, out, scale, all), tol);
  // The check rejects a known-wrong answer: the reference at another scale.
  EXPECT_GT(MaxError(f, q, out, scale * 1.5, all), tol);

  // A token rewritten on the host after the upload: wrong on the device until synced.
  const int s0 = 1, t0 = 199;
  for (int h = 0; h < kKvHeads; ++h) {
    for (int c = 0; c < kHeadDim; ++c) {
      f.SetKv(0, s0, t0, h, c, 4.0f * q.values[(s0 * kHeads + h * kGroup) * kHeadDim + c]);
      f.SetKv(1, s0, t0, h, c, 3.0f);  // outputs stay O(1): the tolerance holds
    }
  }
  Poison(out);
  ASSERT_TRUE((*dev)->Decode(3, io, table, nullptr, static_cast<float>(scale)).ok());
  EXPECT_GT(MaxError(f, q, out, scale, all), tol) << "a stale device token must be caught";
  const int64_t slot = f.Slot(s0, t0);
  ASSERT_TRUE((*dev)->SyncTokens(3, &slot, 1).ok());
  Poison(out);
  ASSERT_TRUE((*dev)->Decode(3, io, table, nullptr, static_cast<float>(scale)).ok());
  EXPECT_LE(MaxError(f, q, out, scale, all), tol);

  // Sparse: sink page, a middle page where there is one, the last page.
  const int max_sel = 3;
  std::vector<int32_t> pages(static_cast<size_t>(f.num_seqs()) * kKvHeads * max_sel, -1);
  std::vector<int32_t> counts(static_cast<size_t>(f.num_seqs()) * kKvHeads, 0);
  for (int s = 0; s < f.num_seqs(); ++s) {
    const int np = NumPages(table.seq_lens[s], spec.block_size);
    for (int h = 0; h < kKvHeads; ++h) {
      int32_t* row = &pages[(static_cast<size_t>(s) * kKvHeads + h) * max_sel];
      int& n = counts[static_cast<size_t>(s) * kKvHeads + h];
      row[n++] = 0;
      if (np > 2) row[n++] = 1 + static_cast<int>(rng() % (np - 2));
      if (np > 1) row[n++] = np - 1;
    }
  }
  const PageList list{pages.data(), counts.data(), kKvHeads, max_sel};
  Poison(out);
  st = (*dev)->Decode(3, io, table, &list, static_cast<float>(scale));
  ASSERT_TRUE(st.ok()) << st;
  auto selected = [&](int s, int h) {
    const size_t r = static_cast<size_t>(s) * kKvHeads + h;
    return PageTokens(f, s, &pages[r * max_sel], counts[r]);
  };
  EXPECT_LE(MaxError(f, q, out, scale, selected), tol);
  EXPECT_GT(MaxError(f, q, out, scale, all), tol) << "sparse must differ from dense here";

  // Bad input: the CPU's errors, naming the value.
  EXPECT_EQ((*dev)->Decode(7, io, table, nullptr, 1.0f).code(), absl::StatusCode::kInvalidArgument);
  pages[0] = 1000;
  st = (*dev)->Decode(3, io, table, &list, 1.0f);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  const int64_t bad = int64_t{1} << 40;
  st = (*dev)->SyncTokens(3, &bad, 1);
  EXPECT_NE(std::string(st.message()).find("past the cache"), std::string::npos) << st;
}

// The pipeline with the GPU apply device: dense and sparse (CPU selection) layers, sync and
// pipelined, against float64 over the pages the pipeline reports it used.
void RunPipeline(absl::string_view placement, PipelineMode mode, int micro_batches) {
  std::mt19937_64 rng(TestSeed());
  FixtureSpec spec;
  spec.dtype = kDtype;
  spec.num_kv_heads = kKvHeads;
  spec.head_dim = kHeadDim;
  spec.seq_lens = {300, 45, 160, 97};
  PagedFixture f(rng, spec);
  const int num_layers = 3;
  PipelineOptions o;
  o.placement = *ParsePlacement(placement);
  o.mode = mode;
  o.micro_batches = micro_batches;
  o.policy.dense_layers = o.placement.dense ? 0 : 1;
  o.policy.selection.budget_tokens = 64;
  o.policy.selection.num_sink_pages = 1;
  o.policy.selection.num_local_pages = 1;
  o.deadline_ms = 10000;
  absl::StatusOr<std::unique_ptr<TestDevice>> dev = TestDevice::Create();
  ASSERT_TRUE(dev.ok()) << dev.status();
  const std::string device_name((*dev)->Name());
  o.apply_device = std::move(*dev);
  std::vector<KvCacheView> caches(num_layers, f.cache_view());  // one cache, three layers
  absl::StatusOr<std::unique_ptr<DecodePipeline>> pipe =
      DecodePipeline::Create(o, caches, kHeads, f.num_seqs(),
                             o.placement.dense ? nullptr : std::make_unique<CpuPageSelector>());
  ASSERT_TRUE(pipe.ok()) << pipe.status();
  EXPECT_EQ((*pipe)->Metrics().apply_device, device_name);
  const BlockTableView table = f.table_view();
  ASSERT_TRUE((*pipe)->Prefill(table).ok());
  const size_t n = static_cast<size_t>(f.num_seqs()) * kHeads * kHeadDim;
  std::vector<RandomTensor> qs;
  std::vector<std::vector<uint8_t>> outs;
  StepInputs in;
  in.table = table;
  for (int l = 0; l < num_layers; ++l) {
    qs.emplace_back(rng, kDtype, n);
    outs.push_back(NanBytes(n));
  }
  for (int l = 0; l < num_layers; ++l) {
    in.queries.push_back(qs[l].data());
    in.outputs.push_back(outs[l].data());
  }
  const absl::Status st = (*pipe)->Step(in);
  ASSERT_TRUE(st.ok()) << st;
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  const double tol = 1.0;  // MaxError is in units of the derived bound
  for (int l = 0; l < num_layers; ++l) {
    const bool sparse = !o.placement.dense && l >= o.policy.dense_layers;
    SelectionView sel{};
    if (sparse) {
      absl::StatusOr<SelectionView> s = (*pipe)->LastSelection(l);
      ASSERT_TRUE(s.ok()) << s.status();
      sel = *s;
    }
    auto tokens = [&](int s, int h) {
      return sparse ? PageTokens(f, s, sel.Row(s, h), sel.Count(s, h)) : AllTokens(f, s);
    };
    EXPECT_LE(MaxError(f, qs[l], outs[l], scale, tokens), tol) << "layer " << l;
    EXPECT_GT(MaxError(f, qs[l], outs[l], scale * 1.5, tokens), tol) << "layer " << l;
  }
}

TEST(ApplyDevicePipeline, DenseSync) {
  SKIP_WITHOUT_GPU();
  RunPipeline("dense", PipelineMode::kSync, 1);
}

TEST(ApplyDevicePipeline, CpuSelectionGpuApplyPipelined) {
  SKIP_WITHOUT_GPU();
  RunPipeline("prepare=cpu,relevancy=cpu,retrieval=cpu,apply=gpu", PipelineMode::kPipelined, 2);
}

}  // namespace
}  // namespace mempipe
