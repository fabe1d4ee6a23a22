#include "tests/testing/fault_injecting_selector.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace mempipe {

FaultInjectingSelector::FaultInjectingSelector(FaultInjectionOptions options)
    : options_(std::move(options)), rng_(options_.seed) {}

absl::Status FaultInjectingSelector::DeadError() const {
  return absl::UnavailableError(absl::StrCat(options_.name, ": device died after ",
                                             options_.die_after_requests, " requests (injected)"));
}

absl::Status FaultInjectingSelector::AddLayer(int layer, const CacheShape& shape) {
  MEMPIPE_RETURN_IF_ERROR(reference_.AddLayer(layer, shape));
  shapes_[layer] = shape;
  return absl::OkStatus();
}

absl::Status FaultInjectingSelector::BuildDigests(int layer, const KvCacheView& cache,
                                                  const BlockTableView& table) {
  if (dead_) return DeadError();
  return reference_.BuildDigests(layer, cache, table);
}

absl::Status FaultInjectingSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                                const void* keys) {
  if (dead_) return DeadError();
  const absl::Status status = reference_.AppendKeys(layer, slots, num_tokens, keys);
  costs_ = reference_.Costs();  // measured; the paced delay models selection only
  return status;
}

absl::StatusOr<SelectTicket> FaultInjectingSelector::Submit(const SelectRequest& request) {
  if (options_.die_after_requests >= 0 && submitted_ >= options_.die_after_requests) {
    dead_ = true;
  }
  ++submitted_;
  const SelectTicket ticket = next_ticket_++;
  if (dead_) {
    if (!options_.death_hangs) return DeadError();
    pending_[ticket] = Pending{absl::InfiniteFuture(), DeadError(), request.out, {}, {}, 0};
    return ticket;
  }
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const bool fail = unit(rng_) < options_.error_probability;
  const bool stall = unit(rng_) < options_.stall_probability;
  double delay_ms = options_.delay_ms + options_.jitter_ms * unit(rng_);
  if (stall) delay_ms += options_.stall_ms;
  if (fail && unit(rng_) < 0.5) {
    return absl::InternalError(absl::StrCat(options_.name, ": submit failed (injected)"));
  }

  const absl::Time start = absl::Now();
  Pending p;
  p.out = request.out;
  p.delay_ms = delay_ms;
  const SelectionView& out = request.out;
  p.pages.assign(static_cast<size_t>(std::max(out.num_seqs, 0)) * out.num_kv_heads *
                     std::max(out.max_selected, 0),
                 -1);
  p.counts.assign(static_cast<size_t>(std::max(out.num_seqs, 0)) * out.num_kv_heads, 0);
  SelectRequest staged = request;
  staged.out.pages = p.pages.data();
  staged.out.counts = p.counts.data();
  MEMPIPE_ASSIGN_OR_RETURN(SelectTicket inner, reference_.Submit(staged));
  p.status = reference_.Wait(inner, absl::InfiniteFuture());
  costs_ = reference_.Costs();
  if (p.status.ok() && options_.scan_gbytes_per_s > 0) {
    // The table was validated by the reference: every seq_len is in range.
    const CacheShape& sh = shapes_.at(request.layer);
    DigestView layout{nullptr, sh.dtype, sh.num_blocks, sh.num_kv_heads, sh.head_dim};
    layout.format = sh.digest_format;  // int8 digests scan fewer bytes
    double bytes = 0;
    for (int s = 0; s < request.table.num_seqs; ++s) {
      bytes += static_cast<double>(NumPages(request.table.seq_lens[s], sh.block_size)) *
               sh.num_kv_heads * static_cast<double>(layout.ScannedBytesPerPageHead());
    }
    p.delay_ms += bytes / (options_.scan_gbytes_per_s * 1e9) * 1e3;
    delay_ms = p.delay_ms;
  }
  if (p.status.ok() && fail) {
    p.status = absl::InternalError(absl::StrCat(options_.name, ": request failed (injected)"));
  }
  // Paced: the result is ready no earlier than submit + delay, and no earlier than the real
  // compute finished.
  p.completes = std::max(start + absl::Milliseconds(delay_ms), absl::Now());
  pending_.emplace(ticket, std::move(p));
  return ticket;
}

absl::Status FaultInjectingSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  auto it = pending_.find(ticket);
  if (it == pending_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  Pending p = std::move(it->second);
  pending_.erase(it);
  const absl::Time wake = std::min(p.completes, deadline);
  if (wake != absl::InfiniteFuture()) {
    const absl::Duration left = wake - absl::Now();
    if (left > absl::ZeroDuration()) {
      std::this_thread::sleep_for(absl::ToChronoNanoseconds(left));
    }
  }
  if (p.completes > deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat(options_.name, ": ticket ", ticket, " missed its deadline"));
  }
  if (options_.report_delay_as_modeled) costs_.modeled_device_ms = p.delay_ms;
  MEMPIPE_RETURN_IF_ERROR(p.status);
  std::copy(p.pages.begin(), p.pages.end(), p.out.pages);
  std::copy(p.counts.begin(), p.counts.end(), p.out.counts);
  return absl::OkStatus();
}

}  // namespace mempipe
