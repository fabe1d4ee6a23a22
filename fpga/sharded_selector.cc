#include "fpga/sharded_selector.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "fpga/device_layout.h"
#include "fpga/request_checks.h"

namespace mempipe {
namespace {

// Copies heads [h0, h1) of rows [n, heads, d] (element size `esize`) into [n, h1 - h0, d].
std::vector<uint8_t> SliceHeads(const void* src, size_t n, int heads, int h0, int h1, int d,
                                size_t esize) {
  const size_t head_bytes = static_cast<size_t>(d) * esize;
  const size_t width = static_cast<size_t>(h1 - h0) * head_bytes;
  std::vector<uint8_t> out(n * width);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(out.data() + i * width, s + (i * heads + h0) * head_bytes, width);
  }
  return out;
}

}  // namespace

ShardedFpgaSelector::ShardedFpgaSelector(std::vector<std::unique_ptr<PageSelector>> cards,
                                         const ShardingParams& params)
    : cards_(std::move(cards)),
      params_(params),
      name_(absl::StrCat(cards_.size(), " x ", cards_.empty() ? "none" : cards_[0]->Name(),
                         " (KV heads sharded)")) {}

std::pair<int, int> ShardedFpgaSelector::HeadsOf(int card, int num_cards, int num_kv_heads) {
  const int64_t h = num_kv_heads;
  return {static_cast<int>(h * card / num_cards), static_cast<int>(h * (card + 1) / num_cards)};
}

std::vector<SelectorCosts> ShardedFpgaSelector::LastCardCosts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return card_costs_;
}

SelectorCosts ShardedFpgaSelector::Costs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return costs_;
}

absl::StatusOr<CacheShape> ShardedFpgaSelector::Find(int layer) const {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return it->second;
}

absl::Status ShardedFpgaSelector::ForEachCard(const std::function<absl::Status(int)>& fn) {
  const int n = num_cards();
  std::vector<absl::Status> status(n);
  std::vector<std::thread> threads;
  for (int i = 0; i + 1 < n; ++i) threads.emplace_back([&, i] { status[i] = fn(i); });
  status[n - 1] = fn(n - 1);
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < n; ++i) {
    if (!status[i].ok()) {
      return absl::Status(status[i].code(), absl::StrCat("card ", i, ": ", status[i].message()));
    }
  }
  return absl::OkStatus();
}

void ShardedFpgaSelector::Combine(const std::vector<SelectorCosts>& per_card, Clock::time_point t0,
                                  bool select) {
  SelectorCosts c;
  bool modeled = false;
  double slowest = 0, energy = 0;
  for (const SelectorCosts& k : per_card) {
    c.prepare_ms += k.prepare_ms;
    c.relevancy_ms += k.relevancy_ms;
    c.retrieval_ms += k.retrieval_ms;
    c.transfer_ms = std::max(c.transfer_ms, k.transfer_ms);  // one PCIe link per card
    if (k.modeled_device_ms) {
      modeled = true;
      slowest = std::max(slowest, *k.modeled_device_ms);
      energy += k.modeled_energy_mj.value_or(0);
    }
  }
  if (modeled) {
    const double n = static_cast<double>(per_card.size());
    const double host_s =
        n * params_.fan_out_per_card_s + (select ? n * params_.fan_in_per_card_s : 0.0);
    c.modeled_device_ms = slowest + host_s * 1e3;
    c.modeled_energy_mj = energy;
  }
  c.host_ms = MsSince(t0);
  std::lock_guard<std::mutex> lock(mu_);
  costs_ = c;
  card_costs_ = per_card;
}

absl::Status ShardedFpgaSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  if (shape.num_kv_heads < num_cards()) {
    return absl::InvalidArgumentError(absl::StrCat(num_cards(), " cards need at least ",
                                                   num_cards(), " KV heads to share; layer ", layer,
                                                   " has ", shape.num_kv_heads));
  }
  for (int i = 0; i < num_cards(); ++i) {
    const auto [h0, h1] = HeadsOf(i, num_cards(), shape.num_kv_heads);
    CacheShape slice = shape;
    slice.num_kv_heads = h1 - h0;
    if (absl::Status s = cards_[i]->AddLayer(layer, slice); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("card ", i, ": ", s.message()));
    }
  }
  layers_[layer] = shape;
  return absl::OkStatus();
}

absl::Status ShardedFpgaSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                             const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(const CacheShape sh, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateAppend(sh, slots, num_tokens, keys));
  const auto t0 = Clock::now();
  std::vector<SelectorCosts> per_card(num_cards());
  MEMPIPE_RETURN_IF_ERROR(ForEachCard([&](int i) -> absl::Status {
    const auto [h0, h1] = HeadsOf(i, num_cards(), sh.num_kv_heads);
    const std::vector<uint8_t> slice =
        SliceHeads(keys, num_tokens, sh.num_kv_heads, h0, h1, sh.head_dim, DTypeSize(sh.dtype));
    MEMPIPE_RETURN_IF_ERROR(cards_[i]->AppendKeys(layer, slots, num_tokens, slice.data()));
    per_card[i] = cards_[i]->Costs();
    return absl::OkStatus();
  }));
  Combine(per_card, t0, /*select=*/false);
  return absl::OkStatus();
}

absl::Status ShardedFpgaSelector::BuildDigests(int layer, const KvCacheView& cache,
                                               const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(const CacheShape sh, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateBuildRequest(layer, cache, table, sh));
  std::vector<int64_t> slots;
  std::vector<uint8_t> keys;
  MEMPIPE_RETURN_IF_ERROR(GatherKeysForBuild(cache, table, slots, keys));
  return AppendKeys(layer, slots.data(), static_cast<int>(slots.size()), keys.data());
}

absl::StatusOr<SelectTicket> ShardedFpgaSelector::Submit(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(const CacheShape sh, Find(request.layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(request.config, sh.block_size));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(request.table, sh.block_size, sh.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(request.query, sh.Geometry(), request.table));
  if (request.out.pages == nullptr || request.out.counts == nullptr ||
      request.out.num_seqs != request.table.num_seqs ||
      request.out.num_kv_heads != sh.num_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection is [", request.out.num_seqs, ", ", request.out.num_kv_heads, ", ",
                     request.out.max_selected, "]; need [", request.table.num_seqs, ", ",
                     sh.num_kv_heads, ", ...] with non-null pointers"));
  }
  Pending p;
  p.submitted = Clock::now();
  p.request = request;
  const int seqs = request.query.num_seqs;
  const int group = request.query.num_heads / sh.num_kv_heads;
  const int max_sel = request.out.max_selected;
  for (int i = 0; i < num_cards(); ++i) {
    const auto [h0, h1] = HeadsOf(i, num_cards(), sh.num_kv_heads);
    p.queries.push_back(SliceHeads(request.query.data, seqs, request.query.num_heads, h0 * group,
                                   h1 * group, sh.head_dim, DTypeSize(request.query.dtype)));
    p.pages.emplace_back(static_cast<size_t>(seqs) * (h1 - h0) * max_sel, -1);
    p.counts.emplace_back(static_cast<size_t>(seqs) * (h1 - h0), 0);
    SelectRequest r = request;
    r.query = QueryView{p.queries.back().data(), request.query.dtype, seqs, (h1 - h0) * group,
                        sh.head_dim};
    r.out = SelectionView{p.pages.back().data(), p.counts.back().data(), seqs, h1 - h0, max_sel};
    auto ticket = cards_[i]->Submit(r);
    if (!ticket.ok()) {
      for (int j = 0; j < i; ++j) {
        (void)cards_[j]->Wait(p.tickets[j], absl::InfiniteFuture());  // drain; result dropped
      }
      return absl::Status(ticket.status().code(),
                          absl::StrCat("card ", i, ": ", ticket.status().message()));
    }
    p.tickets.push_back(*ticket);
  }
  const SelectTicket t = next_ticket_++;
  pending_.emplace(t, std::move(p));
  return t;
}

absl::Status ShardedFpgaSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  auto it = pending_.find(ticket);
  if (it == pending_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  Pending p = std::move(it->second);
  pending_.erase(it);
  // Every card's ticket is waited for, even after one fails, so none is left behind.
  absl::Status first;
  std::vector<SelectorCosts> per_card(num_cards());
  for (int i = 0; i < num_cards(); ++i) {
    absl::Status s = cards_[i]->Wait(p.tickets[i], deadline);
    per_card[i] = cards_[i]->Costs();
    if (!s.ok() && first.ok()) {
      first = absl::Status(s.code(), absl::StrCat("card ", i, ": ", s.message()));
    }
  }
  if (!first.ok()) return first;
  const SelectionView& out = p.request.out;
  const int heads = out.num_kv_heads;
  for (int i = 0; i < num_cards(); ++i) {
    const auto [h0, h1] = HeadsOf(i, num_cards(), heads);
    const SelectionView part{p.pages[i].data(), p.counts[i].data(), out.num_seqs, h1 - h0,
                             out.max_selected};
    for (int s = 0; s < out.num_seqs; ++s) {
      for (int h = h0; h < h1; ++h) {
        std::memcpy(out.Row(s, h), part.Row(s, h - h0), out.max_selected * sizeof(int32_t));
        out.Count(s, h) = part.Count(s, h - h0);
      }
    }
  }
  Combine(per_card, p.submitted, /*select=*/true);
  return absl::OkStatus();
}

}  // namespace mempipe
