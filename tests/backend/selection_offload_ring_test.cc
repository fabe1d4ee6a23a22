// The selection-offload engine with a lagging card (issue 11's append defect): many steps of
// key appends and selections under the overlap schemes (asynchronous reuse C = 4 over two
// micro-batches, pipelined micro-batches), with the emulated U55C slowed by a test hook (an
// in-order queue of fixed-length selections). Checks: no `dead` fallback, every selection the
// card made bit-identical to the CPU reference at the same point of the key stream, every
// append reaching the card exactly once and in issue order (checksums of the keys), and the
// card's digests equal to the reference's at the end. A full append ring delays the producer
// (bounded) instead of killing the card.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "backend/selection_offload.h"
#include "fpga/emulation/emulated_u55c.h"
#include "gtest/gtest.h"
#include "retriever/page_selector.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::FixtureSpec;
using testing::PagedFixture;
using testing::TestSeed;
using SteadyClock = std::chrono::steady_clock;

constexpr int kPoison = -7;
constexpr int kHeadDim = 64;
constexpr int kKvHeads = 2;
constexpr int kHeads = 8;

uint64_t Checksum(const void* data, size_t bytes, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;  // FNV-1a
  return h;
}

struct AppendRecord {
  int layer = 0;
  int num_tokens = 0;
  uint64_t checksum = 0;  // of the slots and the keys
  bool operator==(const AppendRecord& o) const {
    return layer == o.layer && num_tokens == o.num_tokens && checksum == o.checksum;
  }
};

// The test hook: the emulated U55C (functional = reference, digests in its memory) behind an
// in-order queue in which every selection takes `select_ms` (as a paced card: a request starts
// when the previous one is done), honouring Wait's deadline (a late result is discarded, the
// card still spends the time). Every append is logged. Selector thread only, like any
// PageSelector; the log is read after Shutdown.
class SlowCard final : public PageSelector {
 public:
  explicit SlowCard(double select_ms)
      : card_(std::make_unique<EmulatedU55cSelector>(U55cParams{}, /*paced=*/false,
                                                     EmulatedFunctional::kReference, 2)),
        select_(std::chrono::microseconds(static_cast<int64_t>(select_ms * 1000))) {}
  absl::string_view Name() const override { return "slow-card"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override {
    return card_->AddLayer(layer, shape);
  }
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override {
    return card_->BuildDigests(layer, cache, table);
  }
  absl::Status AppendKeys(int layer, const int64_t* slots, int n, const void* keys) override {
    // In order behind the queued selections (one command queue).
    std::this_thread::sleep_until(busy_until_);
    log_.push_back(Record(layer, slots, n, keys, key_bytes_per_token_));
    return card_->AppendKeys(layer, slots, n, keys);
  }
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& r) override {
    busy_until_ = std::max(busy_until_, SteadyClock::now()) + select_;
    absl::StatusOr<SelectTicket> t = card_->Submit(r);
    if (t.ok()) due_[*t] = busy_until_;
    return t;
  }
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override {
    const SteadyClock::time_point due = due_[ticket];
    due_.erase(ticket);
    const auto limit = SteadyClock::now() + absl::ToChronoNanoseconds(std::max(
                                                deadline - absl::Now(), absl::ZeroDuration()));
    if (due > limit) {
      std::this_thread::sleep_until(limit);
      (void)card_->Wait(ticket, absl::InfiniteFuture());  // discarded: too late
      return absl::DeadlineExceededError("slow card: the selection missed its deadline");
    }
    std::this_thread::sleep_until(due);
    return card_->Wait(ticket, absl::InfiniteFuture());
  }
  SelectorCosts Costs() const override { return card_->Costs(); }

  static AppendRecord Record(int layer, const int64_t* slots, int n, const void* keys,
                             size_t key_bytes_per_token) {
    uint64_t h = Checksum(slots, n * sizeof(int64_t));
    h = Checksum(keys, n * key_bytes_per_token, h);
    return {layer, n, h};
  }
  void set_key_bytes_per_token(size_t b) { key_bytes_per_token_ = b; }
  EmulatedU55cSelector& card() { return *card_; }
  const std::vector<AppendRecord>& log() const { return log_; }

 private:
  std::unique_ptr<EmulatedU55cSelector> card_;
  SteadyClock::duration select_;
  SteadyClock::time_point busy_until_ = SteadyClock::now();
  std::map<SelectTicket, SteadyClock::time_point> due_;
  std::vector<AppendRecord> log_;
  size_t key_bytes_per_token_ = 0;
};

CacheShape ShapeOf(const KvCacheView& c) {
  return CacheShape{c.dtype, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
}

// `layers` layers over one random ragged batch (3 sequences: micro-batches [0, 2) and [2, 3)),
// the engine over a SlowCard, and a CPU reference fed the same keys in the same order.
struct Rig {
  std::mt19937_64 rng{TestSeed()};
  PagedFixture f;
  SelectionConfig config;
  SlowCard* card = nullptr;  // owned by the engine
  std::unique_ptr<SelectionOffload> off;
  CpuPageSelector ref{2};
  int layers;
  std::vector<AppendRecord> issued;
  size_t key_bytes_per_token = static_cast<size_t>(kKvHeads) * kHeadDim * sizeof(float);

  Rig(int num_layers, double select_ms, SelectionOffloadOptions options)
      : f(rng, FixtureSpec{.dtype = DType::kFloat32,
                           .block_size = 16,
                           .num_kv_heads = kKvHeads,
                           .head_dim = kHeadDim,
                           .seq_lens = {700, 333, 96}}),
        layers(num_layers) {
    config.budget_tokens = 128;  // 8 of up to 44 pages
    auto sel = std::make_unique<SlowCard>(select_ms);
    sel->set_key_bytes_per_token(key_bytes_per_token);
    card = sel.get();
    auto o = SelectionOffload::Create(std::move(sel), options);
    EXPECT_TRUE(o.ok()) << o.status();
    off = *std::move(o);
    const KvCacheView cache = f.cache_view();
    for (int l = 0; l < layers; ++l) {
      EXPECT_TRUE(off->AddLayer(l, ShapeOf(cache)).ok());
      EXPECT_TRUE(off->BuildDigests(l, cache, f.table_view()).ok());
      EXPECT_TRUE(ref.AddLayer(l, ShapeOf(cache)).ok());
      EXPECT_TRUE(ref.BuildDigests(l, cache, f.table_view()).ok());
    }
  }

  // One new key per sequence at a random used position, large enough to move the digests;
  // appended to the engine and to the reference.
  void Append(int layer) {
    const BlockTableView t = f.table_view();
    std::vector<int64_t> slots;
    for (int s = 0; s < t.num_seqs; ++s) {
      slots.push_back(f.Slot(s, static_cast<int>(rng() % t.seq_lens[s])));
    }
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::vector<float> keys(slots.size() * kKvHeads * kHeadDim);
    for (float& k : keys) k = normal(rng);
    const int n = static_cast<int>(slots.size());
    issued.push_back(SlowCard::Record(layer, slots.data(), n, keys.data(), key_bytes_per_token));
    ASSERT_TRUE(off->Append(layer, slots.data(), n, keys.data()).ok());
    ASSERT_TRUE(ref.AppendKeys(layer, slots.data(), n, keys.data()).ok());
  }

  std::vector<float> NewQuery() {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(static_cast<size_t>(f.table_view().num_seqs) * kHeads * kHeadDim);
    for (float& v : q) v = normal(rng);
    return q;
  }
  // Rows [b, e) of the batch.
  QueryView Query(const std::vector<float>& q, int b, int e) const {
    return QueryView{q.data() + static_cast<size_t>(b) * kHeads * kHeadDim, DType::kFloat32, e - b,
                     kHeads, kHeadDim};
  }
  BlockTableView Table(int b, int e) const {
    BlockTableView t = f.table_view();
    t.block_table += static_cast<size_t>(b) * t.max_blocks_per_seq;
    t.seq_lens += b;
    t.num_seqs = e - b;
    return t;
  }
  int k() const { return config.PagesPerHead(16); }
  // The reference's selection of rows [b, e) now.
  std::vector<int32_t> Expected(int layer, const std::vector<float>& q, int b, int e) {
    const int rows = (e - b) * kKvHeads;
    std::vector<int32_t> sel(static_cast<size_t>(rows) * (k() + 1), -1);
    SelectionView v{sel.data(), sel.data() + static_cast<size_t>(rows) * k(), e - b, kKvHeads, k()};
    auto ticket = ref.Submit({layer, Query(q, b, e), Table(b, e), config, v});
    EXPECT_TRUE(ticket.ok()) << ticket.status();
    EXPECT_TRUE(ref.Wait(*ticket, absl::InfiniteFuture()).ok());
    return sel;
  }
  // Waits for `slot` (rows [b, e)); returns the reason and the selection in Expected's layout.
  OffloadReason Wait(int slot, int b, int e, std::vector<int32_t>& got) {
    const int rows = (e - b) * kKvHeads;
    got.assign(static_cast<size_t>(rows) * (k() + 1), kPoison);
    SelectionView v{got.data(), got.data() + static_cast<size_t>(rows) * k(), e - b, kKvHeads, k()};
    auto r = off->Wait(slot, v);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : OffloadReason::kError;
  }
  // The card's digests of every layer equal the reference's, byte for byte.
  void ExpectDigestsEqual() {
    for (int l = 0; l < layers; ++l) {
      absl::StatusOr<DigestView> want = ref.Digests(l);
      ASSERT_TRUE(want.ok());
      std::vector<uint8_t> bytes(want->NumBytes(), 0xAB);
      DigestView got = *want;
      got.data = bytes.data();
      ASSERT_TRUE(card->card().ReadDigests(l, got).ok());
      EXPECT_EQ(std::memcmp(bytes.data(), want->data, bytes.size()), 0) << "layer " << l;
    }
  }
};

const int kMicroBatches[2][2] = {{0, 2}, {2, 3}};

TEST(SelectionOffloadRing, ChecksRejectWrongAnswers) {
  const int64_t slots[2] = {3, 5};
  const float keys[4] = {1, 2, 3, 4};
  const AppendRecord a = SlowCard::Record(0, slots, 2, keys, 2 * sizeof(float));
  float other[4] = {1, 2, 3, 5};
  EXPECT_FALSE(a == SlowCard::Record(0, slots, 2, other, 2 * sizeof(float)));
  EXPECT_FALSE(a == SlowCard::Record(1, slots, 2, keys, 2 * sizeof(float)));
  // The digest comparison sees one appended key that the card missed.
  Rig rig(1, 0, {.slots = 2, .deadline_ms = 5000});
  rig.Append(0);
  std::vector<int64_t> s1 = {rig.f.Slot(0, 5)};
  std::vector<float> big(kKvHeads * kHeadDim, 1e6f);
  ASSERT_TRUE(rig.ref.AppendKeys(0, s1.data(), 1, big.data()).ok());  // the reference only
  rig.off->Shutdown();
  absl::StatusOr<DigestView> want = rig.ref.Digests(0);
  ASSERT_TRUE(want.ok());
  std::vector<uint8_t> bytes(want->NumBytes());
  DigestView got = *want;
  got.data = bytes.data();
  ASSERT_TRUE(rig.card->card().ReadDigests(0, got).ok());
  EXPECT_NE(std::memcmp(bytes.data(), want->data, bytes.size()), 0);
}

TEST(SelectionOffloadRing, AppendsDoNotWaitOnALaggingCardWhileTheRingHasRoom) {
  // The card is busy 600 ms with a selection (deadline 5 s); select gates are short (20 ms).
  // Six steps of appends on two layers follow at once: each layer's ring (default 8 entries)
  // has room, so none waits and none declares the card dead; the selection made before them
  // sees none of their keys, the one after sees all.
  Rig rig(2, 600, {.slots = 2, .deadline_ms = 5000, .gate_timeout_ms = 20});
  EXPECT_EQ(rig.off->append_ring(), 8);
  const auto q = rig.NewQuery();
  const std::vector<int32_t> before = rig.Expected(0, q, 0, 3);
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q, 0, 3), rig.Table(0, 3), rig.config).ok());
  const auto t0 = SteadyClock::now();
  for (int step = 0; step < 6; ++step) {
    for (int l = 0; l < 2; ++l) rig.Append(l);
  }
  const double append_ms =
      std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
  EXPECT_LT(append_ms, 300) << "appends waited for the card";
  std::vector<int32_t> got;
  EXPECT_EQ(rig.Wait(0, 0, 3, got), OffloadReason::kSelected);
  EXPECT_EQ(got, before);
  const std::vector<int32_t> after = rig.Expected(0, q, 0, 3);
  EXPECT_NE(after, before) << "the appended keys must change the selection for this check";
  ASSERT_TRUE(rig.off->Submit(1, 0, rig.Query(q, 0, 3), rig.Table(0, 3), rig.config).ok());
  EXPECT_EQ(rig.Wait(1, 0, 3, got), OffloadReason::kSelected);
  EXPECT_EQ(got, after);
  rig.off->Shutdown();
  EXPECT_FALSE(rig.off->Metrics().dead) << rig.off->Metrics().death;
  EXPECT_EQ(rig.card->log(), rig.issued);
  rig.ExpectDigestsEqual();
}

TEST(SelectionOffloadRing, AFullRingDelaysTheProducerAndLosesNothing) {
  // A ring of 2 behind a 300 ms selection: the third append of the layer waits (bounded by
  // append_timeout_ms) for the card to take the first, then goes through; the card stays alive.
  Rig rig(1, 300, {.slots = 2, .deadline_ms = 5000, .gate_timeout_ms = 20, .append_ring = 2});
  const auto q = rig.NewQuery();
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q, 0, 3), rig.Table(0, 3), rig.config).ok());
  const auto t0 = SteadyClock::now();
  for (int i = 0; i < 5; ++i) rig.Append(0);
  const double append_ms =
      std::chrono::duration<double, std::milli>(SteadyClock::now() - t0).count();
  EXPECT_GT(append_ms, 150) << "the third append should have waited for a ring entry";
  std::vector<int32_t> got;
  EXPECT_EQ(rig.Wait(0, 0, 3, got), OffloadReason::kSelected);
  rig.off->Shutdown();
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_FALSE(m.dead) << m.death;
  EXPECT_EQ(m.appends, 5);
  EXPECT_EQ(rig.card->log(), rig.issued);
  rig.ExpectDigestsEqual();
  // The bound: a card that takes no key for append_timeout_ms is declared dead.
  Rig stuck(1, 400, {.slots = 2, .deadline_ms = 5000, .append_ring = 1, .append_timeout_ms = 30});
  ASSERT_TRUE(stuck.off->Submit(0, 0, stuck.Query(q, 0, 3), stuck.Table(0, 3), stuck.config).ok());
  stuck.Append(0);
  stuck.Append(0);  // entry still held behind the 400 ms selection: past 30 ms, dead
  const OffloadReason r = stuck.Wait(0, 0, 3, got);  // queued before the death
  EXPECT_TRUE(r == OffloadReason::kSelected || r == OffloadReason::kDead) << OffloadReasonName(r);
  stuck.off->Shutdown();
  EXPECT_TRUE(stuck.off->Metrics().dead);
  EXPECT_NE(stuck.off->Metrics().death.find("append_timeout_ms"), std::string::npos)
      << stuck.off->Metrics().death;
}

// The H200 rows that declared the card dead: asynchronous reuse (C = 4: a round of selections
// submitted at step n, taken in at step n + 1) over two micro-batches and four layers, against
// a card whose round (8 x 30 ms) is longer than the 100 ms default deadline. The round's late
// requests time out (fallbacks, counted) -- the card is late, not broken -- and the rest are
// the reference's, while every append reaches the card once, in order.
TEST(SelectionOffloadRing, LaggingCardUnderAsyncReuseIsNeverDeclaredDead) {
  constexpr int kLayers = 4, kSteps = 16, kReuse = 4;
  Rig rig(kLayers, 30, {.slots = 16});  // default deadline (100 ms) and append ring
  std::vector<std::vector<float>> queries(kLayers);
  std::vector<std::vector<std::vector<int32_t>>> want(kLayers,
                                                      std::vector<std::vector<int32_t>>(2));
  int selected = 0, timeouts = 0, other = 0;
  for (int step = 0; step < kSteps; ++step) {
    for (int l = 0; l < kLayers; ++l) {
      rig.Append(l);
      if (step % kReuse == 1) {  // take the round submitted last step in
        for (int mb = 0; mb < 2; ++mb) {
          std::vector<int32_t> got;
          const auto [b, e] = std::pair(kMicroBatches[mb][0], kMicroBatches[mb][1]);
          const OffloadReason r = rig.Wait(l * 2 + mb, b, e, got);
          if (r == OffloadReason::kSelected) {
            ++selected;
            EXPECT_EQ(got, want[l][mb]) << "step " << step << " layer " << l << " mb " << mb;
          } else if (r == OffloadReason::kTimeout) {
            ++timeouts;
            EXPECT_TRUE(
                std::all_of(got.begin(), got.end(), [](int32_t v) { return v == kPoison; }));
          } else {
            ++other;
            ADD_FAILURE() << "step " << step << " layer " << l << ": " << OffloadReasonName(r);
          }
        }
      }
      if (step % kReuse == 0) {  // submit the next round before decoding
        queries[l] = rig.NewQuery();
        for (int mb = 0; mb < 2; ++mb) {
          const int b = kMicroBatches[mb][0], e = kMicroBatches[mb][1];
          want[l][mb] = rig.Expected(l, queries[l], b, e);
          ASSERT_TRUE(
              rig.off
                  ->Submit(l * 2 + mb, l, rig.Query(queries[l], b, e), rig.Table(b, e), rig.config)
                  .ok());
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the GPU's decode step
  }
  rig.off->Shutdown();
  const OffloadMetrics m = rig.off->Metrics();
  std::cout << "[ info ] selected " << selected << ", timeouts " << timeouts << " (late "
            << m.late_timeouts << "), dead " << m.waited[static_cast<int>(OffloadReason::kDead)]
            << "\n";
  EXPECT_FALSE(m.dead) << m.death;
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kDead)], 0);
  EXPECT_EQ(other, 0);
  EXPECT_GE(selected, kSteps / kReuse);  // at least each round's first
  EXPECT_GT(timeouts, 0) << "the card was meant to lag past the deadline";
  EXPECT_GT(m.late_timeouts, 0);
  EXPECT_EQ(m.appends, kSteps * kLayers);
  EXPECT_EQ(rig.card->log(), rig.issued);
  rig.ExpectDigestsEqual();
}

// Pipelined micro-batches (sync): every step, every layer appends, submits both micro-batches
// and waits for them in order; the card keeps up with the deadline: every selection is the
// card's and bit-identical.
TEST(SelectionOffloadRing, PipelinedMicroBatchesStayExact) {
  constexpr int kLayers = 3, kSteps = 8;
  Rig rig(kLayers, 10, {.slots = 4});
  for (int step = 0; step < kSteps; ++step) {
    for (int l = 0; l < kLayers; ++l) {
      rig.Append(l);
      const auto q = rig.NewQuery();
      std::vector<int32_t> want[2];
      for (int mb = 0; mb < 2; ++mb) {
        const int b = kMicroBatches[mb][0], e = kMicroBatches[mb][1];
        want[mb] = rig.Expected(l, q, b, e);
        ASSERT_TRUE(rig.off->Submit(mb, l, rig.Query(q, b, e), rig.Table(b, e), rig.config).ok());
      }
      for (int mb = 0; mb < 2; ++mb) {
        std::vector<int32_t> got;
        EXPECT_EQ(rig.Wait(mb, kMicroBatches[mb][0], kMicroBatches[mb][1], got),
                  OffloadReason::kSelected)
            << "step " << step << " layer " << l << " mb " << mb;
        EXPECT_EQ(got, want[mb]);
      }
    }
  }
  rig.off->Shutdown();
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_FALSE(m.dead) << m.death;
  EXPECT_EQ(m.waited[0], kSteps * kLayers * 2);
  EXPECT_EQ(rig.card->log(), rig.issued);
  rig.ExpectDigestsEqual();
}

TEST(SelectionOffloadRing, BadRingOptionsAreNamed) {
  auto s = ValidateSelectionOffloadOptions({.append_ring = 0});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("append_ring"), absl::string_view::npos) << s;
  s = ValidateSelectionOffloadOptions({.append_ring = 4096});
  EXPECT_NE(s.message().find("4096"), absl::string_view::npos) << s;
  s = ValidateSelectionOffloadOptions({.append_timeout_ms = 0});
  EXPECT_NE(s.message().find("append_timeout_ms"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace mempipe
