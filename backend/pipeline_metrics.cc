#include "backend/pipeline_metrics.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace mempipe {
namespace {

// JSON string literal (the values here are names and messages; escape what JSON requires).
std::string Quote(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string Num(double v) { return std::isfinite(v) ? absl::StrFormat("%.6g", v) : "null"; }

std::string ChannelJson(const ChannelStats& s) {
  return absl::StrCat("{\"capacity\":", s.capacity, ",\"pushes\":", s.pushes,
                      ",\"max_depth\":", s.max_depth, ",\"mean_depth\":", Num(s.MeanDepth()),
                      ",\"full_events\":", s.full_events, "}");
}

std::string HistText(absl::string_view name, const LatencyHistogram& h) {
  if (h.count() == 0) return absl::StrFormat("  %-16s (none)\n", name);
  return absl::StrFormat("  %-16s n=%-6d mean %.3f  p50<=%.3f  p99<=%.3f  min %.3f  max %.3f ms\n",
                         name, h.count(), h.mean_ms(), h.PercentileMs(0.5), h.PercentileMs(0.99),
                         h.min_ms(), h.max_ms());
}

std::string ChannelText(absl::string_view name, const ChannelStats& s) {
  return absl::StrFormat("  %-16s capacity %d, pushes %d, mean depth %.2f, max depth %d, full %d\n",
                         name, s.capacity, s.pushes, s.MeanDepth(), s.max_depth, s.full_events);
}

}  // namespace

double BusyOverlapMs(const std::vector<BusyInterval>& a, const std::vector<BusyInterval>& b) {
  double total = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const auto lo = std::max(a[i].first, b[j].first);
    const auto hi = std::min(a[i].second, b[j].second);
    if (hi > lo) total += std::chrono::duration<double, std::milli>(hi - lo).count();
    // The interval that ends first cannot meet any later interval of the other list.
    if (a[i].second < b[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return total;
}

void LatencyHistogram::Record(double ms) {
  ms = std::max(ms, 0.0);
  const double us = ms * 1e3;
  int bucket = us < 1 ? 0 : 1 + static_cast<int>(std::floor(std::log2(us)));
  bucket = std::min(bucket, kBuckets - 1);
  ++buckets_[bucket];
  min_ms_ = count_ == 0 ? ms : std::min(min_ms_, ms);
  max_ms_ = std::max(max_ms_, ms);
  sum_ms_ += ms;
  ++count_;
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (other.count_ == 0) return;
  for (int i = 0; i < kBuckets; ++i) buckets_[i] += other.buckets_[i];
  min_ms_ = count_ == 0 ? other.min_ms_ : std::min(min_ms_, other.min_ms_);
  max_ms_ = std::max(max_ms_, other.max_ms_);
  sum_ms_ += other.sum_ms_;
  count_ += other.count_;
}

double LatencyHistogram::PercentileMs(double p) const {
  if (count_ == 0) return 0;
  const double rank = std::clamp(p, 0.0, 1.0) * static_cast<double>(count_);
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets_[i];
    if (static_cast<double>(seen) >= rank && buckets_[i] > 0) {
      // Upper edge of bucket i, clamped to the exact maximum.
      return std::min(std::ldexp(1.0, i) * 1e-3, max_ms_);
    }
  }
  return max_ms_;
}

std::string LatencyHistogram::ToJson() const {
  // Buckets as [upper_edge_us, count] for the non-empty ones.
  std::vector<std::string> b;
  for (int i = 0; i < kBuckets; ++i) {
    if (buckets_[i]) b.push_back(absl::StrCat("[", Num(std::ldexp(1.0, i)), ",", buckets_[i], "]"));
  }
  return absl::StrCat(
      "{\"count\":", count_, ",\"mean_ms\":", Num(mean_ms()), ",\"min_ms\":", Num(min_ms()),
      ",\"max_ms\":", Num(max_ms_), ",\"p50_ms\":", Num(PercentileMs(0.5)),
      ",\"p99_ms\":", Num(PercentileMs(0.99)), ",\"buckets_us\":[", absl::StrJoin(b, ","), "]}");
}

std::string PipelineMetrics::ToText() const {
  std::string s = absl::StrFormat(
      "pipeline: placement %s, mode %s, micro-batches %d, reuse %d, deadline %.3f ms\n"
      "  selector %s, apply on %s\n",
      placement, mode, micro_batches, reuse, deadline_ms, selector, apply_device);
  absl::StrAppendFormat(
      &s,
      "  steps %d, requests %d: fresh selections %d (by selector %d), reused %d\n"
      "  fallbacks %d (timeout %d, error %d, dead %d, expired in queue %d, invalid %d)%s\n",
      steps, requests, selections_fresh, selections_by_selector, selections_reused, fallbacks,
      fallbacks_timeout, fallbacks_error, fallbacks_dead, fallbacks_expired, fallbacks_invalid,
      selector_dead ? absl::StrCat("; selector dead: ", selector_death_reason) : "");
  s += "latency (measured):\n";
  s += HistText("selector queue", selector_queue);
  s += HistText("prepare", prepare);
  s += HistText("select", select);
  s += HistText("fallback select", fallback);
  s += HistText("apply", apply);
  s += HistText("request", request);
  s += HistText("step", step);
  absl::StrAppendFormat(&s, "  selector's own split: relevancy %.3f ms, retrieval %.3f ms in all\n",
                        selector_relevancy_ms, selector_retrieval_ms);
  s += "queues:\n";
  s += ChannelText("to selector", to_selector);
  s += ChannelText("to apply", to_apply);
  s += ChannelText("to front", to_front);
  absl::StrAppendFormat(
      &s,
      "overlap (measured): wall %.3f ms, selector busy %.3f ms, apply busy %.3f ms, both busy "
      "%.3f ms: %.1f%% of selector time hidden behind decoding, %.1f%% of decode time "
      "overlapped\n",
      wall_ms, selector_busy_ms, apply_busy_ms, overlap_ms, 100 * HiddenFraction(),
      100 * ApplyOverlappedFraction());
  absl::StrAppendFormat(&s,
                        "transfers: %d B to selector, %d B back; %.3f ms reported by the "
                        "selector (%s), %.3f ms modeled by the link model (%s)\n",
                        bytes_to_selector, bytes_from_selector, transfer_ms_reported,
                        modeled_calls > 0 ? "modeled, as its device is" : "measured",
                        modeled_transfer_ms, link);
  if (modeled_calls > 0) {
    absl::StrAppendFormat(&s, "modeled device: %.3f ms over %d calls, %.3f mJ (modeled)\n",
                          modeled_device_ms, modeled_calls, modeled_energy_mj);
  }
  return s;
}

std::string PipelineMetrics::ToJson() const {
  return absl::StrCat(
      "{\"placement\":", Quote(placement), ",\"mode\":", Quote(mode),
      ",\"selector\":", Quote(selector), ",\"apply_device\":", Quote(apply_device),
      ",\"micro_batches\":", micro_batches, ",\"reuse\":", reuse,
      ",\"deadline_ms\":", Num(deadline_ms), ",\"steps\":", steps, ",\"requests\":", requests,
      ",\"selections_fresh\":", selections_fresh, ",\"selections_reused\":", selections_reused,
      ",\"selections_by_selector\":", selections_by_selector, ",\"fallbacks\":", fallbacks,
      ",\"fallbacks_timeout\":", fallbacks_timeout, ",\"fallbacks_error\":", fallbacks_error,
      ",\"fallbacks_dead\":", fallbacks_dead, ",\"fallbacks_expired\":", fallbacks_expired,
      ",\"fallbacks_invalid\":", fallbacks_invalid,
      ",\"selector_dead\":", selector_dead ? "true" : "false",
      ",\"selector_death_reason\":", Quote(selector_death_reason),
      ",\"latency_measured\":{\"selector_queue\":", selector_queue.ToJson(),
      ",\"prepare\":", prepare.ToJson(), ",\"select\":", select.ToJson(),
      ",\"fallback\":", fallback.ToJson(), ",\"apply\":", apply.ToJson(),
      ",\"request\":", request.ToJson(), ",\"step\":", step.ToJson(),
      ",\"selector_relevancy_ms\":", Num(selector_relevancy_ms),
      ",\"selector_retrieval_ms\":", Num(selector_retrieval_ms),
      "},\"queues\":{\"to_selector\":", ChannelJson(to_selector),
      ",\"to_apply\":", ChannelJson(to_apply), ",\"to_front\":", ChannelJson(to_front),
      "},\"overlap_measured\":{\"wall_ms\":", Num(wall_ms),
      ",\"selector_busy_ms\":", Num(selector_busy_ms), ",\"apply_busy_ms\":", Num(apply_busy_ms),
      ",\"overlap_ms\":", Num(overlap_ms), ",\"hidden_fraction\":", Num(HiddenFraction()),
      ",\"apply_overlapped_fraction\":", Num(ApplyOverlappedFraction()),
      "},\"transfers\":{\"bytes_to_selector\":", bytes_to_selector,
      ",\"bytes_from_selector\":", bytes_from_selector,
      ",\"reported_by_selector_ms\":", Num(transfer_ms_reported),
      ",\"modeled_link_ms\":", Num(modeled_transfer_ms), ",\"link\":", Quote(link),
      "},\"modeled_device\":{\"calls\":", modeled_calls, ",\"device_ms\":", Num(modeled_device_ms),
      ",\"energy_mj\":", Num(modeled_energy_mj), "}}");
}

}  // namespace mempipe
