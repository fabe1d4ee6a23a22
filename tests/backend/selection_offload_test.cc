// The selection-offload engine in CPU mode: bit-identical to the CPU reference selector through
// the emulated U55C (HLS C-simulation and reference functional models), fallback by reason
// (timeout, error, invalid, dead, busy), late results never corrupting a later request on the
// same slot, shutdown with work in flight, exceptions contained, and bad input named.
#include "backend/selection_offload.h"

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "fpga/fpga_selector.h"
#include "gtest/gtest.h"
#include "retriever/page_selector.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::FixtureSpec;
using testing::PagedFixture;
using testing::TestSeed;

constexpr int kPoison = -7;

// A query [num_seqs, num_heads, head_dim] of N(0, 1) values in `dtype`.
std::vector<uint8_t> RandomQuery(std::mt19937_64& rng, DType dtype, int num_seqs, int num_heads,
                                 int head_dim) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = static_cast<size_t>(num_seqs) * num_heads * head_dim;
  std::vector<uint8_t> q(n * DTypeSize(dtype));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(q.data(), dtype, i, normal(rng));
  return q;
}

struct Selection {
  std::vector<int32_t> pages, counts;
  int num_seqs = 0, num_kv_heads = 0, max_selected = 0;

  Selection(int s, int kvh, int max_sel)
      : pages(static_cast<size_t>(s) * kvh * max_sel, kPoison),
        counts(static_cast<size_t>(s) * kvh, kPoison),
        num_seqs(s),
        num_kv_heads(kvh),
        max_selected(max_sel) {}
  SelectionView view() {
    return {pages.data(), counts.data(), num_seqs, num_kv_heads, max_selected};
  }
  bool operator==(const Selection& o) const { return pages == o.pages && counts == o.counts; }
  bool Untouched() const {
    for (int32_t v : pages) {
      if (v != kPoison) return false;
    }
    for (int32_t v : counts) {
      if (v != kPoison) return false;
    }
    return true;
  }
};

CacheShape ShapeOf(const KvCacheView& c) {
  return CacheShape{c.dtype, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
}

// The CPU reference's selection of `query`, with -1 past k as the engine writes it.
Selection Reference(CpuPageSelector& ref, int layer, const QueryView& q, const BlockTableView& t,
                    const SelectionConfig& config, int kvh, int max_sel) {
  Selection s(t.num_seqs, kvh, max_sel);
  std::fill(s.pages.begin(), s.pages.end(), -1);
  auto ticket = ref.Submit({layer, q, t, config, s.view()});
  EXPECT_TRUE(ticket.ok()) << ticket.status();
  EXPECT_TRUE(ref.Wait(*ticket, absl::InfiniteFuture()).ok());
  return s;
}

// A selector whose requests follow a script: a delay, then OK (the CPU reference's selection),
// an error, a malformed selection, or an exception. It honours Wait's deadline (a late result
// is discarded), like every PageSelector.
struct Step {
  enum Kind { kOk, kError, kGarbage, kThrow };
  Kind kind = kOk;
  double delay_ms = 0;
  bool ignore_deadline = false;  // a hung device: Wait overstays its deadline
};

class ScriptedSelector final : public PageSelector {
 public:
  explicit ScriptedSelector(std::vector<Step> script) : script_(std::move(script)) {}
  absl::string_view Name() const override { return "scripted"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override {
    return ref_.AddLayer(layer, shape);
  }
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override {
    return ref_.BuildDigests(layer, cache, table);
  }
  absl::Status AppendKeys(int layer, const int64_t* slots, int n, const void* keys) override {
    return ref_.AppendKeys(layer, slots, n, keys);
  }
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& r) override {
    const Step step = next_ < script_.size() ? script_[next_] : Step{};
    ++next_;
    if (step.kind == Step::kThrow) throw std::runtime_error("scripted exception");
    Pending p;
    p.step = step;
    p.done = std::chrono::steady_clock::now() +
             std::chrono::microseconds(static_cast<int64_t>(step.delay_ms * 1000));
    p.out = r.out;
    p.pages.assign(static_cast<size_t>(r.out.num_seqs) * r.out.num_kv_heads * r.out.max_selected,
                   -1);
    p.counts.assign(static_cast<size_t>(r.out.num_seqs) * r.out.num_kv_heads, 0);
    SelectRequest mine = r;
    mine.out.pages = p.pages.data();
    mine.out.counts = p.counts.data();
    auto t = ref_.Submit(mine);
    if (!t.ok()) return t.status();
    if (absl::Status s = ref_.Wait(*t, absl::InfiniteFuture()); !s.ok()) return s;
    pending_[next_ticket_] = std::move(p);
    return next_ticket_++;
  }
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override {
    Pending p = std::move(pending_.at(ticket));
    pending_.erase(ticket);
    const auto limit =
        std::chrono::steady_clock::now() +
        absl::ToChronoNanoseconds(std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (p.done > limit && !p.step.ignore_deadline) {
      std::this_thread::sleep_until(limit);
      return absl::DeadlineExceededError("scripted selection is late");
    }
    std::this_thread::sleep_until(p.done);
    if (p.done > limit) return absl::DeadlineExceededError("scripted selection overstayed");
    if (p.step.kind == Step::kError) return absl::InternalError("scripted failure");
    if (p.step.kind == Step::kGarbage) {
      std::fill(p.counts.begin(), p.counts.end(), 1);
      std::fill(p.pages.begin(), p.pages.end(), 0);
    }
    std::copy(p.pages.begin(), p.pages.end(), p.out.pages);
    std::copy(p.counts.begin(), p.counts.end(), p.out.counts);
    return absl::OkStatus();
  }
  SelectorCosts Costs() const override { return {}; }

 private:
  struct Pending {
    Step step;
    std::chrono::steady_clock::time_point done;
    SelectionView out;
    std::vector<int32_t> pages, counts;
  };
  CpuPageSelector ref_;
  std::vector<Step> script_;
  size_t next_ = 0;
  std::map<SelectTicket, Pending> pending_;
  SelectTicket next_ticket_ = 1;
};

// One layer of a random ragged batch, the engine and a CPU reference over the same digests.
struct Rig {
  std::mt19937_64 rng{TestSeed()};
  PagedFixture f;
  SelectionConfig config;
  std::unique_ptr<SelectionOffload> off;
  CpuPageSelector ref{2};
  int num_heads = 8;

  Rig(std::unique_ptr<PageSelector> selector, SelectionOffloadOptions options,
      DType dtype = DType::kFloat32)
      : f(rng, FixtureSpec{.dtype = dtype,
                           .block_size = 16,
                           .num_kv_heads = 2,
                           .head_dim = 64,
                           .seq_lens = {700, 333, 96}}) {
    config.budget_tokens = 128;  // 8 of up to 44 pages
    auto o = SelectionOffload::Create(std::move(selector), options);
    EXPECT_TRUE(o.ok()) << o.status();
    off = *std::move(o);
    const KvCacheView cache = f.cache_view();
    EXPECT_TRUE(off->AddLayer(0, ShapeOf(cache)).ok());
    EXPECT_TRUE(off->BuildDigests(0, cache, f.table_view()).ok());
    EXPECT_TRUE(ref.AddLayer(0, ShapeOf(cache)).ok());
    EXPECT_TRUE(ref.BuildDigests(0, cache, f.table_view()).ok());
  }
  int kvh() const { return 2; }
  int k() const { return config.PagesPerHead(16); }
  QueryView Query(const std::vector<uint8_t>& q) {
    return QueryView{q.data(), f.cache_view().dtype, f.table_view().num_seqs, num_heads, 64};
  }
  std::vector<uint8_t> NewQuery() {
    return RandomQuery(rng, f.cache_view().dtype, f.table_view().num_seqs, num_heads, 64);
  }
  Selection Expected(const std::vector<uint8_t>& q, int max_sel) {
    return Reference(ref, 0, Query(q), f.table_view(), config, kvh(), max_sel);
  }
};

TEST(Selection, ComparisonRejectsAWrongSelection) {
  Selection a(2, 2, 4), b(2, 2, 4);
  ASSERT_TRUE(a == b);
  b.pages[5] = 3;
  EXPECT_FALSE(a == b);
  Selection c(2, 2, 4);
  c.counts[1] = 0;
  EXPECT_FALSE(a == c);
  EXPECT_FALSE(c.Untouched());
}

class EmulatedOffload : public ::testing::TestWithParam<EmulatedFunctional> {};

TEST_P(EmulatedOffload, BitIdenticalToCpuSelectorThroughAppendsAndSlots) {
  FpgaOptions fo;
  fo.functional = GetParam();
  fo.reference_threads = 2;
  auto sel = MakeFpgaSelector(fo);
  ASSERT_TRUE(sel.ok()) << sel.status();
  Rig rig(*std::move(sel), {.slots = 4, .deadline_ms = 5000}, DType::kBFloat16);
  // Two rounds: all slots in flight at once, then new keys appended to the last page of each
  // sequence (both sides) and the same again.
  for (int round = 0; round < 2; ++round) {
    if (round == 1) {
      // Overwrite the newest token of every sequence with fresh keys (slots inside used pages).
      const BlockTableView t = rig.f.table_view();
      std::vector<int64_t> slots;
      for (int s = 0; s < t.num_seqs; ++s) slots.push_back(rig.f.Slot(s, t.seq_lens[s] - 1));
      std::vector<uint8_t> keys =
          RandomQuery(rig.rng, DType::kBFloat16, static_cast<int>(slots.size()), rig.kvh(), 64);
      // Large magnitudes so the appended page's digest really changes.
      for (size_t i = 0; i < slots.size() * rig.kvh() * 64; ++i) {
        StoreFromFloat(keys.data(), DType::kBFloat16, i,
                       8.0f * LoadAsFloat(keys.data(), DType::kBFloat16, i));
      }
      ASSERT_TRUE(
          rig.off->Append(0, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
      ASSERT_TRUE(
          rig.ref.AppendKeys(0, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
    }
    std::vector<std::vector<uint8_t>> queries;
    for (int slot = 0; slot < 4; ++slot) {
      queries.push_back(rig.NewQuery());
      ASSERT_TRUE(
          rig.off->Submit(slot, 0, rig.Query(queries.back()), rig.f.table_view(), rig.config).ok());
    }
    for (int slot = 3; slot >= 0; --slot) {  // waits in any order
      Selection got(3, rig.kvh(), rig.k() + 3);
      auto r = rig.off->Wait(slot, got.view());
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(*r, OffloadReason::kSelected);
      EXPECT_TRUE(got == rig.Expected(queries[slot], rig.k() + 3))
          << "round " << round << " slot " << slot;
    }
  }
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_EQ(m.requests, 8);
  EXPECT_EQ(m.published[0], 8);
  EXPECT_EQ(m.waited[0], 8);
  EXPECT_EQ(m.appends, 1);
  EXPECT_GT(m.modeled_device_ms, 0);
  EXPECT_GT(m.bytes_to_card, 0);
  EXPECT_GT(m.bytes_from_card, 0);
  EXPECT_EQ(m.bytes_d2h, 0);  // CPU mode: no GPU copies
}

INSTANTIATE_TEST_SUITE_P(Functional, EmulatedOffload,
                         ::testing::Values(EmulatedFunctional::kHls,
                                           EmulatedFunctional::kReference));

TEST(SelectionOffload, PacedEmulationCountsModeledTimeAndHostBound) {
  FpgaOptions fo;
  fo.functional = EmulatedFunctional::kReference;
  fo.paced = true;
  // HBM 10^4 times slower than the model's default (tens of ms per selection): every request is
  // device-bound, none host-bound, and each takes at least its modeled time.
  fo.params.hbm_channel_peak_bps /= 1e4;
  auto sel = MakeFpgaSelector(fo);
  ASSERT_TRUE(sel.ok());
  Rig rig(*std::move(sel), {.slots = 2, .deadline_ms = 10000});
  rig.off->ResetMetrics();  // the bulk build's modeled time is not the selection's
  const auto q = rig.NewQuery();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q), rig.f.table_view(), rig.config).ok());
  Selection got(3, rig.kvh(), rig.k());
  auto r = rig.off->Wait(0, got.view());
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, OffloadReason::kSelected);
  EXPECT_TRUE(got == rig.Expected(q, rig.k()));
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_GT(m.modeled_device_ms, 1.0);
  EXPECT_GE(m.selector_ms, m.modeled_device_ms);  // paced: never earlier than the model
  EXPECT_GE(wall_ms, m.modeled_device_ms);
  EXPECT_LT(m.functional_ms, m.modeled_device_ms);
  EXPECT_EQ(m.host_bound, 0);
  // Unpaced and at the default rates the same request is host-bound (the model is faster than
  // this host): the count can be non-zero.
  FpgaOptions fast;
  fast.functional = EmulatedFunctional::kHls;
  auto sel2 = MakeFpgaSelector(fast);
  ASSERT_TRUE(sel2.ok());
  Rig rig2(*std::move(sel2), {.slots = 1, .deadline_ms = 10000});
  rig2.off->ResetMetrics();
  const auto q2 = rig2.NewQuery();
  ASSERT_TRUE(rig2.off->Submit(0, 0, rig2.Query(q2), rig2.f.table_view(), rig2.config).ok());
  ASSERT_TRUE(rig2.off->Wait(0, got.view()).ok());
  const OffloadMetrics m2 = rig2.off->Metrics();
  EXPECT_EQ(m2.host_bound, m2.functional_ms > m2.modeled_device_ms ? 1 : 0);
}

TEST(SelectionOffload, LateResultNeverCorruptsTheNextRequestOnItsSlot) {
  // Request 1 arrives 150 ms late (deadline 40 ms); request 2 on the same slot is prompt.
  Rig rig(std::make_unique<ScriptedSelector>(
              std::vector<Step>{{Step::kOk, 150}, {Step::kOk, 0}, {Step::kOk, 0}}),
          {.slots = 2, .deadline_ms = 40, .gate_timeout_ms = 1000});
  const auto q1 = rig.NewQuery(), q2 = rig.NewQuery();
  ASSERT_TRUE(rig.off->Submit(1, 0, rig.Query(q1), rig.f.table_view(), rig.config).ok());
  Selection first(3, rig.kvh(), rig.k());
  auto r1 = rig.off->Wait(1, first.view());
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(*r1, OffloadReason::kTimeout);
  EXPECT_TRUE(first.Untouched());  // a fallback leaves the caller's buffers alone
  ASSERT_TRUE(rig.off->Submit(1, 0, rig.Query(q2), rig.f.table_view(), rig.config).ok());
  Selection second(3, rig.kvh(), rig.k());
  auto r2 = rig.off->Wait(1, second.view());
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(*r2, OffloadReason::kSelected);
  const Selection want2 = rig.Expected(q2, rig.k());
  EXPECT_TRUE(second == want2);
  // The check can fail: request 1's selection differs from request 2's.
  EXPECT_FALSE(rig.Expected(q1, rig.k()) == want2);
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kTimeout)], 1);
  EXPECT_EQ(m.waited[0], 1);
}

TEST(SelectionOffload, ErrorsInvalidSelectionsAndDeath) {
  // error, garbage, exception: three failures in a row declare the selector dead.
  Rig rig(std::make_unique<ScriptedSelector>(std::vector<Step>{{Step::kOk, 0},
                                                               {Step::kError, 0},
                                                               {Step::kOk, 0},
                                                               {Step::kError, 0},
                                                               {Step::kGarbage, 0},
                                                               {Step::kThrow, 0},
                                                               {Step::kOk, 0}}),
          {.slots = 1, .deadline_ms = 2000, .dead_after_failures = 3});
  const OffloadReason want[] = {OffloadReason::kSelected, OffloadReason::kError,
                                OffloadReason::kSelected, OffloadReason::kError,
                                OffloadReason::kInvalid,  OffloadReason::kError,
                                OffloadReason::kDead,     OffloadReason::kDead};
  for (int i = 0; i < 8; ++i) {
    const auto q = rig.NewQuery();
    ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q), rig.f.table_view(), rig.config).ok());
    Selection got(3, rig.kvh(), rig.k());
    auto r = rig.off->Wait(0, got.view());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*r, want[i]) << "request " << i << ": " << OffloadReasonName(*r);
    if (*r == OffloadReason::kSelected) {
      EXPECT_TRUE(got == rig.Expected(q, rig.k()));
    } else {
      EXPECT_TRUE(got.Untouched()) << "request " << i;
    }
  }
  const OffloadMetrics m = rig.off->Metrics();
  EXPECT_TRUE(m.dead);
  EXPECT_NE(m.death.find("scripted exception"), std::string::npos) << m.death;
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kError)], 3);
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kInvalid)], 1);
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kDead)], 2);
  EXPECT_TRUE(rig.off->dead());
}

TEST(SelectionOffload, BusyWhenTheSlotsPreviousRequestStillHoldsItsInputs) {
  // Request 1 on slot 0 hangs 300 ms, past its 30 ms deadline (a device ignoring it); the
  // caller gives up and resubmits at once with a short gate: the selector still reads request
  // 1's inputs, so request 2 fails as busy rather than overwrite them.
  Rig rig(std::make_unique<ScriptedSelector>(
              std::vector<Step>{{Step::kOk, 300, /*ignore_deadline=*/true}, {Step::kOk, 0}}),
          {.slots = 2, .deadline_ms = 30, .dead_after_failures = 5, .gate_timeout_ms = 5});
  const auto q = rig.NewQuery();
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q), rig.f.table_view(), rig.config).ok());
  Selection a(3, rig.kvh(), rig.k());
  auto r = rig.off->Wait(0, a.view());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, OffloadReason::kTimeout);
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q), rig.f.table_view(), rig.config).ok());
  r = rig.off->Wait(0, a.view());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, OffloadReason::kBusy);
  EXPECT_TRUE(a.Untouched());
}

TEST(SelectionOffload, ShutdownWithWorkInFlightPublishesEveryRequest) {
  std::vector<Step> script(16, Step{Step::kOk, 5});
  Rig rig(std::make_unique<ScriptedSelector>(script), {.slots = 16, .deadline_ms = 5000});
  std::vector<std::vector<uint8_t>> queries;
  for (int slot = 0; slot < 16; ++slot) {
    queries.push_back(rig.NewQuery());
    ASSERT_TRUE(
        rig.off->Submit(slot, 0, rig.Query(queries.back()), rig.f.table_view(), rig.config).ok());
  }
  rig.off->Shutdown();  // drains: every queued request is run and published, in order
  EXPECT_EQ(rig.off->Metrics().requests, 16);
  for (int slot = 0; slot < 16; ++slot) {
    Selection got(3, rig.kvh(), rig.k());
    auto r = rig.off->Wait(slot, got.view());
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, OffloadReason::kSelected) << "slot " << slot;
    EXPECT_TRUE(got == rig.Expected(queries[slot], rig.k())) << "slot " << slot;
  }
  const auto q = rig.NewQuery();
  const absl::Status after = rig.off->Submit(0, 0, rig.Query(q), rig.f.table_view(), rig.config);
  EXPECT_EQ(after.code(), absl::StatusCode::kFailedPrecondition) << after;
  rig.off->Shutdown();  // idempotent
}

TEST(SelectionOffload, ManySlotsAndThreadsKeepOrderAndLoseNothing) {
  // Two issuing threads, each with its own slots, interleaving appends and selections.
  Rig rig(std::make_unique<ScriptedSelector>(std::vector<Step>{}),
          {.slots = 8, .deadline_ms = 5000});
  std::atomic<int> wrong{0};
  std::vector<std::vector<uint8_t>> pool;
  std::vector<Selection> expected;
  for (int i = 0; i < 4; ++i) {
    pool.push_back(rig.NewQuery());
    expected.push_back(rig.Expected(pool.back(), rig.k()));
  }
  auto worker = [&](int first_slot) {
    for (int iter = 0; iter < 25; ++iter) {
      for (int s = first_slot; s < first_slot + 4; ++s) {
        const int qi = (iter + s) % 4;
        if (!rig.off->Submit(s, 0, rig.Query(pool[qi]), rig.f.table_view(), rig.config).ok()) {
          ++wrong;
        }
      }
      for (int s = first_slot; s < first_slot + 4; ++s) {
        Selection got(3, rig.kvh(), rig.k());
        auto r = rig.off->Wait(s, got.view());
        if (!r.ok() || *r != OffloadReason::kSelected || !(got == expected[(iter + s) % 4])) {
          ++wrong;
        }
      }
    }
  };
  std::thread a(worker, 0), b(worker, 4);
  a.join();
  b.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(rig.off->Metrics().requests, 200);
}

TEST(SelectionOffload, BadInputIsNamed) {
  Rig rig(std::make_unique<ScriptedSelector>(std::vector<Step>{}),
          {.slots = 2, .deadline_ms = 100});
  const auto q = rig.NewQuery();
  const BlockTableView t = rig.f.table_view();
  auto expect = [](const absl::Status& s, absl::StatusCode code, const char* needle) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << s;
  };
  expect(rig.off->Submit(2, 0, rig.Query(q), t, rig.config), absl::StatusCode::kInvalidArgument,
         "got 2");
  expect(rig.off->Submit(-1, 0, rig.Query(q), t, rig.config), absl::StatusCode::kInvalidArgument,
         "got -1");
  expect(rig.off->Submit(0, 9, rig.Query(q), t, rig.config), absl::StatusCode::kInvalidArgument,
         "layer 9");
  QueryView bad = rig.Query(q);
  bad.num_heads = 3;
  expect(rig.off->Submit(0, 0, bad, t, rig.config), absl::StatusCode::kInvalidArgument, "got 3");
  bad = rig.Query(q);
  bad.dtype = DType::kBFloat16;
  expect(rig.off->Submit(0, 0, bad, t, rig.config), absl::StatusCode::kInvalidArgument, "bf16");
  SelectionConfig c = rig.config;
  c.budget_tokens = 100;
  expect(rig.off->Submit(0, 0, rig.Query(q), t, c), absl::StatusCode::kInvalidArgument, "100");
  Selection got(3, rig.kvh(), rig.k());
  expect(rig.off->Wait(0, got.view()).status(), absl::StatusCode::kFailedPrecondition,
         "no submitted request");
  ASSERT_TRUE(rig.off->Submit(0, 0, rig.Query(q), t, rig.config).ok());
  expect(rig.off->Submit(0, 0, rig.Query(q), t, rig.config), absl::StatusCode::kFailedPrecondition,
         "not waited for");
  Selection small(3, rig.kvh(), rig.k() - 1);
  expect(rig.off->Wait(0, small.view()).status(), absl::StatusCode::kInvalidArgument,
         std::to_string(rig.k() - 1).c_str());
  expect(rig.off->AddLayer(0, ShapeOf(rig.f.cache_view())), absl::StatusCode::kAlreadyExists,
         "layer 0");
  std::vector<int64_t> slots = {1 << 30};
  std::vector<float> keys(2 * 64, 1.0f);
  // An append the selector rejects (slot outside the cache) makes its digests untrustworthy:
  // the selector is declared dead.
  ASSERT_TRUE(rig.off->Append(0, slots.data(), 1, keys.data()).ok());
  rig.off->Shutdown();
  EXPECT_TRUE(rig.off->Metrics().dead);
  EXPECT_NE(rig.off->Metrics().death.find("append"), std::string::npos);
  expect(ValidateSelectionOffloadOptions({.slots = 0}), absl::StatusCode::kInvalidArgument,
         "got 0");
  expect(ValidateSelectionOffloadOptions({.deadline_ms = -1}), absl::StatusCode::kInvalidArgument,
         "got -1");
  expect(SelectionOffload::Create(nullptr, {}).status(), absl::StatusCode::kInvalidArgument,
         "selector");
}

}  // namespace
}  // namespace mempipe
