#include "retriever/page_selector.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/clock.h"
#include "core/status_macros.h"

namespace mempipe {

KvCacheView CacheShape::Geometry() const {
  static int placeholder = 0;
  return KvCacheView{&placeholder, dtype, num_blocks, block_size, num_kv_heads, head_dim};
}

absl::Status ValidateCacheShape(const CacheShape& shape) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDigestFormat(shape.digest_format));
  return ValidateKvCache(shape.Geometry());
}

DigestView CpuPageSelector::Layer::View() {
  DigestView v{digests.data(), shape.dtype, shape.num_blocks, shape.num_kv_heads, shape.head_dim};
  v.format = shape.digest_format;
  if (v.format == DigestFormat::kInt8) {
    v.scales = scales.data();
    v.exact = exact.data();
  }
  return v;
}

absl::StatusOr<CpuPageSelector::Layer*> CpuPageSelector::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return &it->second;
}

absl::StatusOr<DigestView> CpuPageSelector::Digests(int layer) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  return l->View();
}

absl::Status CpuPageSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  Layer& l = layers_[layer];
  l.shape = shape;
  const DigestView v = l.View();
  l.digests.assign(v.NumBytes(), 0);
  l.scales.assign(v.ScaleBytes() / sizeof(float), 0.0f);
  l.exact.assign(v.ExactBytes(), 0);
  return absl::OkStatus();
}

absl::Status CpuPageSelector::BuildDigests(int layer, const KvCacheView& cache,
                                           const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  const auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(mempipe::BuildDigests(cache, table, l->View()));
  costs_ = SelectorCosts{};
  costs_.prepare_ms = costs_.host_ms = MsSince(t0);
  return absl::OkStatus();
}

absl::Status CpuPageSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                         const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  const auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(
      UpdateDigestsFromKeys(l->View(), l->shape.block_size, slots, num_tokens, keys));
  costs_ = SelectorCosts{};
  costs_.prepare_ms = costs_.host_ms = MsSince(t0);
  return absl::OkStatus();
}

absl::StatusOr<SelectTicket> CpuPageSelector::Submit(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(request.layer));
  const SelectTicket ticket = next_ticket_++;
  const CacheShape& sh = l->shape;
  const KvCacheView geometry = sh.Geometry();  // steps 2-3 never read the cache itself
  costs_ = SelectorCosts{};
  const auto t0 = Clock::now();
  absl::Status status = ValidateSelectionConfig(request.config, sh.block_size);
  if (status.ok() && !request.config.hierarchy.Flat()) {
    // The two-level reference, its super-page digests built from the page digests on the spot
    // (so its host time is not the fewer-bytes scan a device keeps its super digests for).
    status = ScoreAndSelect(request.query, geometry, l->View(), request.table, request.config,
                            request.out);
    costs_.relevancy_ms = costs_.host_ms = MsSince(t0);
    done_.emplace(ticket, std::move(status));
    return ticket;
  }
  if (status.ok()) {
    scores_.resize(static_cast<size_t>(std::max(request.table.num_seqs, 0)) * sh.num_kv_heads *
                   std::max(request.table.max_blocks_per_seq, 0));
    status = ComputeRelevancy(request.query, geometry, l->View(), request.table,
                              request.config.aggregation, scores_.data(), num_threads_);
  }
  costs_.relevancy_ms = MsSince(t0);
  if (status.ok()) {
    const auto t1 = Clock::now();
    status = SelectPages(scores_.data(), request.table, sh.block_size, sh.num_kv_heads,
                         request.config, request.out, num_threads_);
    costs_.retrieval_ms = MsSince(t1);
  }
  costs_.host_ms = MsSince(t0);
  done_.emplace(ticket, std::move(status));
  return ticket;
}

absl::Status CpuPageSelector::Wait(SelectTicket ticket, absl::Time /*deadline*/) {
  auto it = done_.find(ticket);
  if (it == done_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  absl::Status status = std::move(it->second);
  done_.erase(it);
  return status;
}

}  // namespace mempipe
