// mempipe backend: what the decode pipeline measures, and how it prints it.
//
// All times are measured wall times on the machine that ran the pipeline, except the fields
// named `modeled_*`, which come from a device model (an emulated FPGA, or the pipeline's own
// LinkModel for transfers a selector does not report) and are labeled "modeled" when printed.
//
//   PipelineMetrics m = pipeline->Metrics();
//   std::cout << m.ToText();
//   json_out << m.ToJson();   // one JSON object
#ifndef MEMPIPE_BACKEND_PIPELINE_METRICS_H_
#define MEMPIPE_BACKEND_PIPELINE_METRICS_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend/spsc_channel.h"

namespace mempipe {

// Latency histogram with power-of-two microsecond buckets: bucket 0 holds [0, 1) us, bucket i
// holds [2^(i-1), 2^i) us; the last bucket is open-ended. Percentiles report the upper edge of
// the bucket they fall in (so they overestimate by at most 2x), min/max/mean are exact.
class LatencyHistogram {
 public:
  static constexpr int kBuckets = 32;

  void Record(double ms);
  void Merge(const LatencyHistogram& other);

  uint64_t count() const { return count_; }
  double sum_ms() const { return sum_ms_; }
  double min_ms() const { return count_ ? min_ms_ : 0; }
  double max_ms() const { return max_ms_; }
  double mean_ms() const { return count_ ? sum_ms_ / count_ : 0; }
  // p in [0, 1].
  double PercentileMs(double p) const;
  const std::array<uint64_t, kBuckets>& buckets() const { return buckets_; }

  std::string ToJson() const;

 private:
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  double sum_ms_ = 0;
  double min_ms_ = 0;
  double max_ms_ = 0;
};

// [begin, end) of one piece of work on one thread.
using BusyInterval =
    std::pair<std::chrono::steady_clock::time_point, std::chrono::steady_clock::time_point>;

// Total time during which two threads were busy at once. Each list holds one thread's busy
// intervals, in time order and disjoint (a thread does one thing at a time).
double BusyOverlapMs(const std::vector<BusyInterval>& a, const std::vector<BusyInterval>& b);

struct PipelineMetrics {
  // Configuration, for the report.
  std::string placement;
  std::string mode;
  std::string selector;      // PageSelector::Name(), "none" for dense
  std::string apply_device;  // where apply actually ran (may differ from the placement's)
  int micro_batches = 1;
  int reuse = 1;
  double deadline_ms = 0;

  // Counts.
  uint64_t steps = 0;
  uint64_t requests = 0;           // (step, micro-batch, layer) units, each completed once
  uint64_t selections_fresh = 0;   // requests that needed a new selection
  uint64_t selections_reused = 0;  // requests served by an earlier selection (reuse=C)
  uint64_t selections_by_selector = 0;
  uint64_t fallbacks = 0;          // = the four below
  uint64_t fallbacks_timeout = 0;  // the selector missed the deadline
  uint64_t fallbacks_error = 0;    // Submit or Wait failed
  uint64_t fallbacks_dead = 0;     // the selector was declared dead before the request
  uint64_t fallbacks_expired = 0;  // the deadline had passed while the request was queued
  uint64_t fallbacks_invalid = 0;  // the selector said OK but its selection failed the checks
                                   // (ValidateSelection: counts, order, range, sinks, locals)
  bool selector_dead = false;
  std::string selector_death_reason;

  // Latencies per stage.
  LatencyHistogram selector_queue;  // issued -> picked up by the selector thread
  LatencyHistogram prepare;         // AppendKeys on the selector device
  LatencyHistogram select;          // Submit -> Wait returned (selector device)
  LatencyHistogram fallback;        // local ScoreAndSelect on the apply device
  LatencyHistogram apply;           // decode attention of one micro-batch and layer
  LatencyHistogram request;         // issued -> applied (end to end)
  LatencyHistogram step;            // one Step() call

  // Steps 2 and 3 as the selector's Costs() split them (its host time; a modeled device's own
  // time is in modeled_device_ms), summed over completed selections.
  double selector_relevancy_ms = 0;
  double selector_retrieval_ms = 0;

  // Queues (as seen by their producers).
  ChannelStats to_selector;
  ChannelStats to_apply;
  ChannelStats to_front;

  // Overlap: the selector thread's busy time (prepare + select, including a device's paced wait)
  // against the apply thread's busy time (decode + fallback + local digests).
  double wall_ms = 0;  // sum of Step() wall times
  double selector_busy_ms = 0;
  double apply_busy_ms = 0;
  double overlap_ms = 0;  // time both were busy at once
  // Fraction of the selector's busy time hidden behind decoding (overlap / selector busy).
  double HiddenFraction() const { return selector_busy_ms > 0 ? overlap_ms / selector_busy_ms : 0; }
  // Fraction of the decoder's busy time during which the selector was busy too.
  double ApplyOverlappedFraction() const {
    return apply_busy_ms > 0 ? overlap_ms / apply_busy_ms : 0;
  }

  // Transfers inserted between the apply device and the selector device.
  uint64_t bytes_to_selector = 0;
  uint64_t bytes_from_selector = 0;
  // As reported by the selector (SelectorCosts::transfer_ms): modeled when the selector is a
  // modeled device (modeled_calls > 0), else measured.
  double transfer_ms_reported = 0;
  double modeled_transfer_ms = 0;  // modeled by the pipeline's LinkModel where not reported
  std::string link;                // the LinkModel's source

  // From a modeled device (SelectorCosts::modeled_*), summed; zero when none is modeled.
  double modeled_device_ms = 0;
  double modeled_energy_mj = 0;
  uint64_t modeled_calls = 0;

  std::string ToText() const;
  std::string ToJson() const;
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_PIPELINE_METRICS_H_
