// mempipe backend: a PageSelector that behaves like a slow, flaky device, for fault injection
// and for studying overlap without hardware.
//
// It computes with the CPU reference (so every selection it returns is the reference's), and
// then makes the result complete at submit time + delay (+ random jitter): Wait() sleeps until
// then (never spins), so the selector thread is busy for the paced time the way it would be
// waiting on a device. On top of that it injects, at random or on schedule:
//  * errors (Submit or Wait fails with Internal),
//  * stalls (the result arrives `stall_ms` late, so any shorter deadline is missed),
//  * death (from the N-th request on every call fails with Unavailable, or hangs until the
//    caller's deadline and then reports DeadlineExceeded).
// A timed-out request's result is discarded and never written to the caller's buffer.
//
//   FaultInjectionOptions o;
//   o.delay_ms = 0.5; o.jitter_ms = 0.5; o.error_probability = 0.05; o.die_after_requests = 40;
//   auto selector = std::make_unique<FaultInjectingSelector>(o);
#ifndef MEMPIPE_TESTS_TESTING_FAULT_INJECTING_SELECTOR_H_
#define MEMPIPE_TESTS_TESTING_FAULT_INJECTING_SELECTOR_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "retriever/page_selector.h"

namespace mempipe {

struct FaultInjectionOptions {
  std::string name = "fault-injecting";
  double delay_ms = 0;   // paced completion: submit + delay_ms
  double jitter_ms = 0;  // plus a uniform random [0, jitter_ms)
  // > 0: plus the digest bytes the request scans at this rate (GB/s), a bandwidth-bound device
  // in the simplest terms (a stand-in, not a device model: fpga/ has the U55C's).
  double scan_gbytes_per_s = 0;
  double error_probability = 0;     // per request
  double stall_probability = 0;     // per request
  double stall_ms = 1000;           // how late a stalled result arrives
  int64_t die_after_requests = -1;  // < 0: never dies
  bool death_hangs = false;         // dead: Wait waits for the deadline instead of failing fast
  // Report the paced delay as Costs().modeled_device_ms (a stand-in device model, labeled
  // modeled by whoever prints it).
  bool report_delay_as_modeled = false;
  uint64_t seed = 1;
};

class FaultInjectingSelector final : public PageSelector {
 public:
  explicit FaultInjectingSelector(FaultInjectionOptions options);

  absl::string_view Name() const override { return options_.name; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override { return costs_; }

  int64_t submitted() const { return submitted_; }
  bool dead() const { return dead_; }

 private:
  struct Pending {
    absl::Time completes;
    absl::Status status;
    SelectionView out;
    std::vector<int32_t> pages;  // staged result, copied to `out` on success
    std::vector<int32_t> counts;
    double delay_ms = 0;
  };
  absl::Status DeadError() const;

  FaultInjectionOptions options_;
  CpuPageSelector reference_;
  std::map<int, CacheShape> shapes_;
  std::mt19937_64 rng_;
  std::map<SelectTicket, Pending> pending_;
  SelectTicket next_ticket_ = 1;
  int64_t submitted_ = 0;
  bool dead_ = false;
  SelectorCosts costs_;
};

}  // namespace mempipe

#endif  // MEMPIPE_TESTS_TESTING_FAULT_INJECTING_SELECTOR_H_
