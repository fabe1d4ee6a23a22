// The offload's GPU side (backend/gpu/gpu_selection_offload.h) on a device: selections made by
// the emulated U55C reach device memory through the wait kernel, bit-identical to the GPU's own
// selector; stream order (append before submit before wait before decode) holds without a host
// wait; the whole step captures into a CUDA graph and replays; a late card falls back on the
// device (timeout) and the predicates then run the dense decode instead of the sparse one.
// Every test skips without a GPU; MEMPIPE_REQUIRE_GPU=1 turns that into a failure.
#include "backend/gpu/gpu_selection_offload.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention/gpu/paged_decode_gpu.h"
#include "core/gpu/gpu_events.h"
#include "core/gpu/gpu_runtime.h"
#include "core/status_macros.h"
#include "fpga/emulation/emulated_u55c.h"
#include "fpga/fpga_selector.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/gpu/select_gpu.h"
#include "tests/testing/gpu_test_util.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

#define SKIP_WITHOUT_GPU() MEMPIPE_SKIP_WITHOUT_GPU("GPU offload test")
using testing::Download;
using testing::Upload;

constexpr int kKvh = 2, kHeads = 8, kDim = 128, kBlock = 16;

// A bf16 batch on the device, the engine over the emulated card, and the GPU selector's
// digests of the same cache.
struct GpuRig {
  std::mt19937_64 rng{testing::TestSeed()};
  testing::PagedFixture f;
  KvCacheView cache;
  BlockTableView table;
  DeviceBuffer d_cache, d_table, d_lens, d_digests, d_q, d_pages, d_counts, d_status, d_ref_pages,
      d_ref_counts, d_ws;
  std::vector<uint8_t> q;
  SelectionConfig config;
  std::unique_ptr<GpuSelectionOffload> off;
  GpuStreamOwner stream;
  int k = 0, max_sel = 0;

  GpuRig(FpgaOptions fo, SelectionOffloadOptions eo) : GpuRig(MakeSelector(fo), eo) {}
  GpuRig(std::unique_ptr<PageSelector> sel, SelectionOffloadOptions eo)
      : f(rng, {.dtype = DType::kBFloat16,
                .block_size = kBlock,
                .num_kv_heads = kKvh,
                .head_dim = kDim,
                .seq_lens = {1500, 777, 64}}) {
    cache = f.cache_view();
    table = f.table_view();
    config.budget_tokens = 256;
    k = config.PagesPerHead(kBlock);
    max_sel = k + 2;
    stream = *GpuStreamOwner::Create();
    d_cache = Upload(cache.data, cache.NumBytes());
    d_table =
        Upload(table.block_table, sizeof(int32_t) * table.num_seqs * table.max_blocks_per_seq);
    d_lens = Upload(table.seq_lens, sizeof(int32_t) * table.num_seqs);
    // Reference digests (CPU build, bit-identical to the GPU's) on the device.
    DigestView dv = f.digest_view();
    EXPECT_TRUE(BuildDigests(cache, table, dv).ok());
    d_digests = Upload(dv.data, dv.NumBytes());
    NewQuery();
    const size_t rows = static_cast<size_t>(table.num_seqs) * kKvh;
    d_pages = Upload(std::vector<int32_t>(rows * max_sel, -7));
    d_counts = Upload(std::vector<int32_t>(rows, -7));
    d_ref_pages = Upload(std::vector<int32_t>(rows * max_sel, -9));
    d_ref_counts = Upload(std::vector<int32_t>(rows, -9));
    d_status = Upload(std::vector<int32_t>{-1});
    d_ws = Upload(std::vector<uint8_t>(SelectWorkspaceBytes(table, kKvh), 0xff));
    auto o = GpuSelectionOffload::Create(std::move(sel), eo);
    EXPECT_TRUE(o.ok()) << o.status();
    off = *std::move(o);
    EXPECT_TRUE(
        off->engine().AddLayer(0, {cache.dtype, cache.num_blocks, kBlock, kKvh, kDim}).ok());
    EXPECT_TRUE(off->engine().BuildDigests(0, cache, table).ok());
  }
  static std::unique_ptr<PageSelector> MakeSelector(const FpgaOptions& fo) {
    auto sel = MakeFpgaSelector(fo);
    EXPECT_TRUE(sel.ok()) << sel.status();
    return sel.ok() ? *std::move(sel) : nullptr;
  }
  void NewQuery() {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = static_cast<size_t>(table.num_seqs) * kHeads * kDim;
    q.assign(n * 2, 0);
    for (size_t i = 0; i < n; ++i) StoreFromFloat(q.data(), DType::kBFloat16, i, normal(rng));
    if (d_q.data() == nullptr) {
      d_q = Upload(q);
    } else {
      EXPECT_TRUE(d_q.CopyFromHost(q.data(), q.size()).ok());
    }
  }
  QueryView DeviceQuery() const {
    return {d_q.data(), DType::kBFloat16, table.num_seqs, kHeads, kDim};
  }
  BlockTableView DeviceTable() const {
    return {static_cast<const int32_t*>(d_table.data()), static_cast<const int32_t*>(d_lens.data()),
            table.num_seqs, table.max_blocks_per_seq};
  }
  SelectionView Out() const {
    return {static_cast<int32_t*>(d_pages.data()), static_cast<int32_t*>(d_counts.data()),
            table.num_seqs, kKvh, max_sel};
  }
  SelectionView RefOut() const {
    return {static_cast<int32_t*>(d_ref_pages.data()), static_cast<int32_t*>(d_ref_counts.data()),
            table.num_seqs, kKvh, max_sel};
  }
  DigestView DeviceDigests() const {
    return {d_digests.data(), DType::kBFloat16, cache.num_blocks, kKvh, kDim};
  }
  KvCacheView DeviceCache() const {
    KvCacheView c = cache;
    c.data = d_cache.data();
    return c;
  }
  // The GPU selector's selection of the current query (same stream).
  absl::Status GpuSelect(DevicePredicate pred = {}) {
    return ScoreAndSelectGpu(DeviceQuery(), DeviceCache(), DeviceDigests(), DeviceTable(), config,
                             RefOut(), d_ws.data(), d_ws.size(), stream.get(), pred);
  }
  size_t Rows() const { return static_cast<size_t>(table.num_seqs) * kKvh; }
};

FpgaOptions Emulated(bool paced) {
  FpgaOptions fo;
  fo.functional = EmulatedFunctional::kReference;
  fo.reference_threads = 4;
  fo.paced = paced;
  return fo;
}

TEST(GpuSelectionOffload, BitIdenticalToTheGpuSelectorInStreamOrder) {
  SKIP_WITHOUT_GPU();
  GpuRig rig(Emulated(/*paced=*/true), {.slots = 4, .deadline_ms = 2000});
  for (int step = 0; step < 3; ++step) {
    rig.NewQuery();
    ASSERT_TRUE(rig.off
                    ->Submit(step % 4, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config,
                             rig.stream.get())
                    .ok());
    ASSERT_TRUE(rig.off
                    ->Wait(step % 4, rig.Out(), static_cast<int32_t*>(rig.d_status.data()),
                           rig.stream.get())
                    .ok());
    ASSERT_TRUE(rig.GpuSelect().ok());
    ASSERT_TRUE(rig.stream.Synchronize().ok());
    EXPECT_EQ(Download<int32_t>(rig.d_status, 1)[0], 0) << "step " << step;
    const auto got = Download<int32_t>(rig.d_pages, rig.Rows() * rig.max_sel);
    const auto want = Download<int32_t>(rig.d_ref_pages, rig.Rows() * rig.max_sel);
    EXPECT_EQ(got, want) << "step " << step;
    EXPECT_EQ(Download<int32_t>(rig.d_counts, rig.Rows()),
              Download<int32_t>(rig.d_ref_counts, rig.Rows()));
    // The comparison can fail: the last column past k is -1 in both, but a poisoned buffer is not.
    EXPECT_NE(got, std::vector<int32_t>(got.size(), -7));
  }
  double wait_ms = 0;
  auto m = rig.off->Metrics(&wait_ms);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->waited[0], 3);
  EXPECT_EQ(m->waits, 3);
  EXPECT_GT(m->bytes_d2h, 0);
  EXPECT_GT(m->bytes_h2d, 0);
  EXPECT_GT(wait_ms, 0);
  EXPECT_GT(m->modeled_device_ms, 0);
  std::cout << "[ info ] GPU wait " << wait_ms << " ms over 3 waits; selector " << m->selector_ms
            << " ms measured, " << m->modeled_device_ms << " ms modeled\n";
}

TEST(GpuSelectionOffload, AppendReachesTheCardBeforeTheNextSelection) {
  SKIP_WITHOUT_GPU();
  GpuRig rig(Emulated(/*paced=*/false), {.slots = 2, .deadline_ms = 2000});
  // New keys (large, so the page's digest changes) at the last token of every sequence, on
  // both sides: the offload through the stream, the reference digests on the host.
  std::vector<int64_t> slots;
  for (int s = 0; s < rig.table.num_seqs; ++s) {
    slots.push_back(rig.f.Slot(s, rig.table.seq_lens[s] - 1));
  }
  std::vector<uint8_t> keys(slots.size() * kKvh * kDim * 2);
  std::normal_distribution<float> normal(0.0f, 8.0f);
  for (size_t i = 0; i < keys.size() / 2; ++i) {
    StoreFromFloat(keys.data(), DType::kBFloat16, i, normal(rig.rng));
  }
  DeviceBuffer d_slots = Upload(slots), d_keys = Upload(keys);
  ASSERT_TRUE(rig.off
                  ->Append(0, static_cast<const int64_t*>(d_slots.data()),
                           static_cast<int>(slots.size()), d_keys.data(), rig.stream.get())
                  .ok());
  ASSERT_TRUE(
      rig.off->Submit(0, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get())
          .ok());
  ASSERT_TRUE(
      rig.off->Wait(0, rig.Out(), static_cast<int32_t*>(rig.d_status.data()), rig.stream.get())
          .ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  // Reference: the CPU's digests after the same update, then the GPU selector on them.
  DigestView dv = rig.f.digest_view();
  ASSERT_TRUE(
      UpdateDigestsFromKeys(dv, kBlock, slots.data(), static_cast<int>(slots.size()), keys.data())
          .ok());
  ASSERT_TRUE(rig.d_digests.CopyFromHost(dv.data, dv.NumBytes()).ok());
  ASSERT_TRUE(rig.GpuSelect().ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  EXPECT_EQ(Download<int32_t>(rig.d_status, 1)[0], 0);
  EXPECT_EQ(Download<int32_t>(rig.d_pages, rig.Rows() * rig.max_sel),
            Download<int32_t>(rig.d_ref_pages, rig.Rows() * rig.max_sel));
  auto m = rig.off->Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->appends, 1);
  EXPECT_EQ(m->appended_tokens, static_cast<int64_t>(slots.size()));
}

// The append ring (issue 11): ten appends queued on the stream behind a selection that keeps
// a slow (paced) card busy, with a ring of 4 entries per layer: the gate kernels wait for free
// entries on the stream instead of declaring the card dead, each append reaches the card once
// and in order (its digests equal the host's after the same ten updates), and the next
// selection is the GPU selector's over those digests.
TEST(GpuSelectionOffload, AppendRingKeepsEveryKeyInOrderBehindALaggingCard) {
  SKIP_WITHOUT_GPU();
  U55cParams params;
  params.hbm_channel_peak_bps /= 1e4;  // tens of ms per selection, paced
  auto card = std::make_unique<EmulatedU55cSelector>(params, /*paced=*/true,
                                                     EmulatedFunctional::kReference, 4);
  EmulatedU55cSelector* card_ptr = card.get();
  GpuRig rig(std::move(card), {.slots = 2, .deadline_ms = 5000, .append_ring = 4});
  DeviceBuffer d_status0 = Upload(std::vector<int32_t>{-1});
  ASSERT_TRUE(
      rig.off->Submit(0, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get())
          .ok());
  DigestView dv = rig.f.digest_view();  // the host's digests (built by the rig)
  std::vector<DeviceBuffer> keep;
  std::normal_distribution<float> normal(0.0f, 8.0f);
  constexpr int kAppends = 10;
  for (int i = 0; i < kAppends; ++i) {
    std::vector<int64_t> slots;
    for (int s = 0; s < rig.table.num_seqs; ++s) {
      slots.push_back(rig.f.Slot(s, static_cast<int>(rig.rng() % rig.table.seq_lens[s])));
    }
    std::vector<uint8_t> keys(slots.size() * kKvh * kDim * 2);
    for (size_t j = 0; j < keys.size() / 2; ++j) {
      StoreFromFloat(keys.data(), DType::kBFloat16, j, normal(rig.rng));
    }
    keep.push_back(Upload(slots));
    keep.push_back(Upload(keys));
    ASSERT_TRUE(rig.off
                    ->Append(0, static_cast<const int64_t*>(keep[keep.size() - 2].data()),
                             static_cast<int>(slots.size()), keep.back().data(), rig.stream.get())
                    .ok());
    ASSERT_TRUE(
        UpdateDigestsFromKeys(dv, kBlock, slots.data(), static_cast<int>(slots.size()), keys.data())
            .ok());
  }
  ASSERT_TRUE(
      rig.off->Wait(0, rig.Out(), static_cast<int32_t*>(d_status0.data()), rig.stream.get()).ok());
  rig.NewQuery();
  ASSERT_TRUE(
      rig.off->Submit(1, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get())
          .ok());
  ASSERT_TRUE(
      rig.off->Wait(1, rig.Out(), static_cast<int32_t*>(rig.d_status.data()), rig.stream.get())
          .ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  ASSERT_TRUE(rig.d_digests.CopyFromHost(dv.data, dv.NumBytes()).ok());
  ASSERT_TRUE(rig.GpuSelect().ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  EXPECT_EQ(Download<int32_t>(d_status0, 1)[0], 0);
  EXPECT_EQ(Download<int32_t>(rig.d_status, 1)[0], 0);
  EXPECT_EQ(Download<int32_t>(rig.d_pages, rig.Rows() * rig.max_sel),
            Download<int32_t>(rig.d_ref_pages, rig.Rows() * rig.max_sel));
  rig.off->Shutdown();
  auto m = rig.off->Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->dead) << m->death;
  EXPECT_EQ(m->appends, kAppends);
  EXPECT_EQ(m->append_ring, 4);
  std::vector<uint8_t> card_digests(dv.NumBytes(), 0xAB);
  DigestView got = dv;
  got.data = card_digests.data();
  ASSERT_TRUE(card_ptr->ReadDigests(0, got).ok());
  EXPECT_EQ(std::memcmp(card_digests.data(), dv.data, card_digests.size()), 0)
      << "the card's digests differ from the host's after the same appends";
}

TEST(GpuSelectionOffload, LateCardFallsBackOnTheDeviceAndPredicatesPickTheDecode) {
  SKIP_WITHOUT_GPU();
  FpgaOptions fo = Emulated(/*paced=*/true);
  fo.params.hbm_channel_peak_bps /= 1e4;  // a card far slower than the 5 ms deadline
  GpuRig rig(fo, {.slots = 2, .deadline_ms = 5, .dead_after_failures = 100});
  ASSERT_TRUE(
      rig.off->Submit(1, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get())
          .ok());
  int32_t* status = static_cast<int32_t*>(rig.d_status.data());
  ASSERT_TRUE(rig.off->Wait(1, rig.Out(), status, rig.stream.get()).ok());
  // Fallback selection on the GPU only when status != 0; sparse decode only when it is 0;
  // dense decode only when it is not.
  ASSERT_TRUE(rig.GpuSelect(DevicePredicate{status, /*run_when_zero=*/false}).ok());
  const size_t out_elems = static_cast<size_t>(rig.table.num_seqs) * kHeads * kDim;
  const std::vector<uint16_t> nan_bf16(out_elems, 0x7fc0);
  DeviceBuffer d_sparse = Upload(nan_bf16), d_dense = Upload(nan_bf16),
               d_dense_ref = Upload(nan_bf16);
  const size_t ws_bytes =
      PagedDecodeWorkspaceBytes(rig.table.num_seqs, kHeads, kKvh, rig.table.max_blocks_per_seq);
  DeviceBuffer d_dws = Upload(std::vector<uint8_t>(std::max<size_t>(ws_bytes, 16), 0));
  auto io = [&](const DeviceBuffer& out) {
    DecodeIo d;
    d.query = rig.d_q.data();
    d.out = out.data();
    d.dtype = DType::kBFloat16;
    d.num_seqs = rig.table.num_seqs;
    d.num_heads = kHeads;
    d.head_dim = kDim;
    return d;
  };
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const PageList pages{static_cast<int32_t*>(rig.d_pages.data()),
                       static_cast<int32_t*>(rig.d_counts.data()), kKvh, rig.max_sel};
  ASSERT_TRUE(SparseDecodeGpu(io(d_sparse), rig.DeviceCache(), rig.DeviceTable(), pages, scale,
                              d_dws.data(), d_dws.size(), rig.stream.get(),
                              DevicePredicate{status, true})
                  .ok());
  ASSERT_TRUE(DenseDecodeGpu(io(d_dense), rig.DeviceCache(), rig.DeviceTable(), scale, d_dws.data(),
                             d_dws.size(), rig.stream.get(), DevicePredicate{status, false})
                  .ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  ASSERT_TRUE(DenseDecodeGpu(io(d_dense_ref), rig.DeviceCache(), rig.DeviceTable(), scale,
                             d_dws.data(), d_dws.size(), rig.stream.get())
                  .ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  EXPECT_EQ(Download<int32_t>(rig.d_status, 1)[0], static_cast<int>(OffloadReason::kTimeout));
  // The offload left the selection alone; the GPU's fallback selection ran.
  EXPECT_EQ(Download<int32_t>(rig.d_pages, rig.Rows() * rig.max_sel),
            std::vector<int32_t>(rig.Rows() * rig.max_sel, -7));
  EXPECT_NE(Download<int32_t>(rig.d_ref_pages, rig.Rows() * rig.max_sel),
            std::vector<int32_t>(rig.Rows() * rig.max_sel, -9));
  // Sparse skipped (still NaN), dense ran and equals an unconditional dense decode bit for bit.
  const auto sparse = Download<uint16_t>(d_sparse, out_elems);
  const auto dense = Download<uint16_t>(d_dense, out_elems);
  EXPECT_EQ(sparse, nan_bf16);
  EXPECT_EQ(dense, Download<uint16_t>(d_dense_ref, out_elems));
  EXPECT_NE(dense, sparse);
  auto m = rig.off->Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->waited[static_cast<int>(OffloadReason::kTimeout)], 1);
  rig.off->Shutdown();  // the late request is drained, then the thread joins
}

TEST(GpuSelectionOffload, StepCapturesIntoAGraphAndReplays) {
  SKIP_WITHOUT_GPU();
  GpuRig rig(Emulated(/*paced=*/true), {.slots = 2, .deadline_ms = 2000});
  int32_t* status = static_cast<int32_t*>(rig.d_status.data());
  std::vector<int64_t> slots = {rig.f.Slot(0, rig.table.seq_lens[0] - 1)};
  std::vector<uint8_t> keys(kKvh * kDim * 2);
  for (size_t i = 0; i < keys.size() / 2; ++i) {
    StoreFromFloat(keys.data(), DType::kBFloat16, i, 0.25f);
  }
  DeviceBuffer d_slots = Upload(slots), d_keys = Upload(keys);
  // Outside capture, the first use of a slot or a layer sizes its staging (pinned memory cannot
  // be allocated while capturing): a warm-up step, as torch's graph capture asks anyway.
  const absl::Status inside = [&]() -> absl::Status {
    auto g = GpuGraph::Capture(rig.stream.get(), [&]() -> absl::Status {
      return rig.off->Submit(1, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config,
                             rig.stream.get());
    });
    return g.status();
  }();
  EXPECT_EQ(inside.code(), absl::StatusCode::kFailedPrecondition) << inside;
  ASSERT_TRUE(rig.off
                  ->Append(0, static_cast<const int64_t*>(d_slots.data()), 1, d_keys.data(),
                           rig.stream.get())
                  .ok());
  ASSERT_TRUE(
      rig.off->Submit(0, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get())
          .ok());
  ASSERT_TRUE(rig.off->Wait(0, rig.Out(), status, rig.stream.get()).ok());
  ASSERT_TRUE(rig.stream.Synchronize().ok());
  ASSERT_TRUE(rig.off->ResetMetrics().ok());
  auto graph = GpuGraph::Capture(rig.stream.get(), [&]() -> absl::Status {
    MEMPIPE_RETURN_IF_ERROR(rig.off->Append(0, static_cast<const int64_t*>(d_slots.data()), 1,
                                            d_keys.data(), rig.stream.get()));
    MEMPIPE_RETURN_IF_ERROR(
        rig.off->Submit(0, 0, rig.DeviceQuery(), rig.DeviceTable(), rig.config, rig.stream.get()));
    MEMPIPE_RETURN_IF_ERROR(rig.off->Wait(0, rig.Out(), status, rig.stream.get()));
    return rig.GpuSelect(DevicePredicate{status, /*run_when_zero=*/false});
  });
  ASSERT_TRUE(graph.ok()) << graph.status();
  DigestView dv = rig.f.digest_view();
  ASSERT_TRUE(UpdateDigestsFromKeys(dv, kBlock, slots.data(), 1, keys.data()).ok());
  ASSERT_TRUE(rig.d_digests.CopyFromHost(dv.data, dv.NumBytes()).ok());
  for (int replay = 0; replay < 3; ++replay) {
    rig.NewQuery();  // new inputs into the captured buffers
    ASSERT_TRUE(graph->Launch(rig.stream.get()).ok());
    ASSERT_TRUE(rig.GpuSelect().ok());
    ASSERT_TRUE(rig.stream.Synchronize().ok());
    EXPECT_EQ(Download<int32_t>(rig.d_status, 1)[0], 0) << "replay " << replay;
    EXPECT_EQ(Download<int32_t>(rig.d_pages, rig.Rows() * rig.max_sel),
              Download<int32_t>(rig.d_ref_pages, rig.Rows() * rig.max_sel))
        << "replay " << replay;
  }
  auto m = rig.off->Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->waited[0], 3);
  EXPECT_EQ(m->requests, 3);
  EXPECT_EQ(m->appends, 3);
}

}  // namespace
}  // namespace mempipe
