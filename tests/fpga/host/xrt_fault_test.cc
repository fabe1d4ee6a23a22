// The XRT selector's error paths (issue 14, item 9): when one KV head's run fails while the
// other heads' runs are still in flight, the buffers those runs use must stay alive until the
// card is done with them, and a failed digest update must not destroy the launch in use.
//
// XRT's noop shim completes every run, so a FakeCard stands in for the card through the
// selector's test hooks (XrtPageSelector::SetRunHooksForTesting): it fails one chosen run (an
// error state, or a throwing wait), keeps the others "in flight" until the test finishes them,
// and then does what a card does with a finishing run's buffers: reads its inputs and writes its
// outputs through their host views. Freed buffers make that a heap-use-after-free under ASan
// (the suite's ASan build); in every build the selector must also report the request as kept
// (abandoned_for_testing) and drop it once the card has finished.
//
// Against the selector before the fix (ae0f7b3^ with these hooks added: Wait erased the failed
// request and RunUpdate let its local launch go out of scope), the five tests of the paths that
// fix changed fail: XrtScoreFault ErrorState and WaitThrows, XrtUpdateFault ErrorState,
// WaitThrows and StartThrows each report 0 abandoned requests instead of 1, and under ASan the
// card's read of the freed input buffer is a heap-use-after-free. XrtScoreFault StartThrows and
// XrtFakeCard (a missed deadline) pass there too: Submit's error path and the deadline path
// already kept their buffers.
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "fpga/fpga_selector.h"
#include "fpga/host/xrt_selector.h"
#include "gtest/gtest.h"
#include "tests/fpga/noop_xrt.h"
#include "tests/fpga/test_data.h"

namespace mempipe {
namespace {

const auto* const kEnv =
    ::testing::AddGlobalTestEnvironment(new testing::NoopXrtEnvironment(/*completion_delay_us=*/0));

using Probe = XrtPageSelector::RunProbe;

enum class Failure { kErrorState, kWaitThrows, kStartThrows };

std::string FailureName(const ::testing::TestParamInfo<Failure>& info) {
  switch (info.param) {
    case Failure::kErrorState:
      return "ErrorState";
    case Failure::kWaitThrows:
      return "WaitThrows";
    case Failure::kStartThrows:
      return "StartThrows";
  }
  return "Unknown";
}

// Stands in for the card. Runs of `fail_kind` on `fail_head` fail (once) the way `failure`
// says; every other run stays in flight until Finish(), which plays the card's last accesses to
// each in-flight run's buffers; after that XRT's own states pass through.
class FakeCard {
 public:
  FakeCard(Probe::Kind fail_kind, int fail_head, Failure failure)
      : fail_kind_(fail_kind), fail_head_(fail_head), failure_(failure) {}

  XrtPageSelector::RunHooksForTesting Hooks() {
    XrtPageSelector::RunHooksForTesting h;
    h.started = [this](const Probe& p) {
      runs_[p.id] = p;
      if (armed_ && failure_ == Failure::kStartThrows && Fails(p)) {
        armed_ = false;
        failed_.insert(p.id);
        throw std::runtime_error("fake card: start of head " + std::to_string(p.kv_head));
      }
    };
    h.state = [this](const Probe& p, ert_cmd_state xrt_state) -> ert_cmd_state {
      if (failed_.count(p.id)) return ERT_CMD_STATE_ERROR;
      if (armed_ && Fails(p)) {
        armed_ = false;
        failed_.insert(p.id);
        if (failure_ == Failure::kWaitThrows) {
          throw std::runtime_error("fake card: wait of head " + std::to_string(p.kv_head));
        }
        return ERT_CMD_STATE_ERROR;
      }
      return finished_ ? xrt_state : ERT_CMD_STATE_RUNNING;
    };
    return h;
  }

  // The card finishes every run still in flight: it reads each one's inputs and writes its
  // outputs (a use-after-free if the selector freed them), then reports XRT's states.
  int Finish() {
    int touched = 0;
    for (const auto& [id, p] : runs_) {
      if (failed_.count(id) || done_.count(id)) continue;
      volatile uint8_t sink = 0;
      for (size_t i = 0; i < p.in_bytes; i += 512) sink = sink + p.in[i];
      if (p.out != nullptr) std::memset(p.out, 0x5a, p.out_bytes);
      done_.insert(id);
      ++touched;
    }
    finished_ = true;
    return touched;
  }

  // Runs started so far of `kind`.
  int Started(Probe::Kind kind) const {
    int n = 0;
    for (const auto& [id, p] : runs_) n += p.kind == kind;
    return n;
  }

 private:
  bool Fails(const Probe& p) const { return p.kind == fail_kind_ && p.kv_head == fail_head_; }

  Probe::Kind fail_kind_;
  int fail_head_;
  Failure failure_;
  bool armed_ = true;
  bool finished_ = false;
  std::map<uint64_t, Probe> runs_;
  std::set<uint64_t> failed_, done_;
};

constexpr int kKvHeads = 4;  // four runs per request, one per KV head

struct Rig {
  std::unique_ptr<XrtPageSelector> sel;
  testing::Batch batch;
  std::vector<int32_t> pages, counts;
  SelectionConfig config;

  SelectRequest Request() {
    return SelectRequest{0, batch.Query(), batch.Table(), config,
                         SelectionView{pages.data(), counts.data(), 2, kKvHeads, 4}};
  }
};

Rig MakeRig(const char* what) {
  std::mt19937_64 rng(testing::FreshSeed(what));
  Rig s;
  FpgaOptions o;
  o.backend = FpgaBackend::kXrt;
  auto sel = XrtPageSelector::Open(o);
  EXPECT_TRUE(sel.ok()) << sel.status();
  if (!sel.ok()) return s;
  s.sel = std::move(*sel);
  s.batch = testing::MakeBatch(rng, DType::kFloat16, 16, kKvHeads, 64, 2, {300, 90}, 0, false);
  EXPECT_TRUE(s.sel->AddLayer(0, {s.batch.dtype, s.batch.num_blocks, 16, kKvHeads, 64}).ok());
  EXPECT_TRUE(s.sel->BuildDigests(0, s.batch.Cache(), s.batch.Table()).ok());
  s.config.budget_tokens = 16 * 4;
  s.pages.assign(2 * kKvHeads * 4, 0);
  s.counts.assign(2 * kKvHeads, 0);
  return s;
}

class XrtScoreFault : public ::testing::TestWithParam<Failure> {};

// Head 0's score run fails (at its wait, or at the start of head 2) while the other heads' runs
// are in flight: the request's buffers stay until the card finishes them.
TEST_P(XrtScoreFault, InFlightRunsKeepTheirBuffers) {
  const Failure failure = GetParam();
  Rig s = MakeRig("XrtScoreFault");
  ASSERT_NE(s.sel, nullptr);
  const int fail_head = failure == Failure::kStartThrows ? 2 : 0;
  FakeCard card(Probe::Kind::kScore, fail_head, failure);
  s.sel->SetRunHooksForTesting(card.Hooks());

  const SelectRequest req = s.Request();
  absl::Status status;
  auto ticket = s.sel->Submit(req);
  if (failure == Failure::kStartThrows) {
    ASSERT_FALSE(ticket.ok());
    status = ticket.status();
    EXPECT_EQ(card.Started(Probe::Kind::kScore), 3);  // heads 0-2 started, 0 and 1 in flight
  } else {
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    EXPECT_EQ(card.Started(Probe::Kind::kScore), kKvHeads);
    // A finite deadline polls run states; an infinite one waits on each run.
    status = s.sel->Wait(*ticket, failure == Failure::kErrorState ? absl::Now() + absl::Seconds(30)
                                                                  : absl::InfiniteFuture());
  }
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_EQ(s.sel->abandoned_for_testing(), 1u)
      << "the failed request's buffers must be kept while its other runs are in flight";
  // The card finishes the runs in flight: reads their inputs, writes their outputs.
  EXPECT_EQ(card.Finish(), failure == Failure::kStartThrows ? 2 : kKvHeads - 1);

  // The selector keeps working, and drops the abandoned request once its runs have finished.
  ticket = s.sel->Submit(req);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE(s.sel->Wait(*ticket, absl::Now() + absl::Seconds(30)).ok());
  EXPECT_EQ(s.sel->abandoned_for_testing(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Failures, XrtScoreFault,
                         ::testing::Values(Failure::kErrorState, Failure::kWaitThrows,
                                           Failure::kStartThrows),
                         FailureName);

class XrtUpdateFault : public ::testing::TestWithParam<Failure> {};

// Head 0's digest-update run fails while heads 1-3 update on their own CUs: RunUpdate returns the
// error but keeps the launch (its buffers) until those runs finish.
TEST_P(XrtUpdateFault, FailedUpdateKeepsTheLaunchInUse) {
  const Failure failure = GetParam();
  Rig s = MakeRig("XrtUpdateFault");
  ASSERT_NE(s.sel, nullptr);
  FakeCard card(Probe::Kind::kUpdate, failure == Failure::kStartThrows ? 2 : 0, failure);
  s.sel->SetRunHooksForTesting(card.Hooks());

  const int64_t slots[] = {static_cast<int64_t>(s.batch.table[0]) * 16 + 3};
  std::vector<uint16_t> key(kKvHeads * 64, 0x3c00);  // fp16 1.0
  const absl::Status status = s.sel->AppendKeys(0, slots, 1, key.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_NE(status.message().find("digest update on layer 0"), std::string::npos) << status;
  EXPECT_EQ(s.sel->abandoned_for_testing(), 1u)
      << "the failed launch's buffers must be kept while its other runs are in flight";
  EXPECT_EQ(card.Finish(), failure == Failure::kStartThrows ? 2 : kKvHeads - 1);

  ASSERT_TRUE(s.sel->AppendKeys(0, slots, 1, key.data()).ok());
  auto ticket = s.sel->Submit(s.Request());
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE(s.sel->Wait(*ticket, absl::InfiniteFuture()).ok());
  EXPECT_EQ(s.sel->abandoned_for_testing(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Failures, XrtUpdateFault,
                         ::testing::Values(Failure::kErrorState, Failure::kWaitThrows,
                                           Failure::kStartThrows),
                         FailureName);

// The fake card itself: with no failure armed for any run, a request completes normally after
// Finish(), so the tests above see the selector's behaviour, not the card's.
TEST(XrtFakeCard, PassesRunsThroughOnceFinished) {
  Rig s = MakeRig("XrtFakeCard");
  ASSERT_NE(s.sel, nullptr);
  FakeCard card(Probe::Kind::kScore, /*fail_head=*/-1, Failure::kErrorState);
  s.sel->SetRunHooksForTesting(card.Hooks());
  auto ticket = s.sel->Submit(s.Request());
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  // In flight until the card finishes: a short deadline is missed.
  EXPECT_EQ(s.sel->Wait(*ticket, absl::Now() + absl::Milliseconds(5)).code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(s.sel->abandoned_for_testing(), 1u);
  EXPECT_EQ(card.Finish(), kKvHeads);
  ticket = s.sel->Submit(s.Request());
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  EXPECT_TRUE(s.sel->Wait(*ticket, absl::Now() + absl::Seconds(30)).ok());
  EXPECT_EQ(s.sel->abandoned_for_testing(), 0u);
}

}  // namespace
}  // namespace mempipe
