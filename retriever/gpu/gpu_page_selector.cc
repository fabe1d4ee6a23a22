#include "retriever/gpu/gpu_page_selector.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "retriever/gpu/digest_gpu.h"
#include "retriever/gpu/select_gpu.h"
#include "retriever/relevancy.h"

namespace mempipe {
namespace {

double MsSince(absl::Time t0) { return absl::ToDoubleMilliseconds(absl::Now() - t0); }

}  // namespace

DigestView GpuPageSelector::Layer::View() {
  DigestView v{digests.data(), shape.dtype, shape.num_blocks, shape.num_kv_heads, shape.head_dim};
  v.format = shape.digest_format;
  if (v.format == DigestFormat::kInt8) {
    v.scales = static_cast<float*>(scales.data());
    v.exact = exact.data();
  }
  return v;
}

absl::StatusOr<std::unique_ptr<GpuPageSelector>> GpuPageSelector::Create() {
  if (GpuDeviceCount() == 0) return absl::UnavailableError("GpuPageSelector: no GPU device");
  std::unique_ptr<GpuPageSelector> s(new GpuPageSelector);
  MEMPIPE_ASSIGN_OR_RETURN(s->stream_, GpuStreamOwner::Create());
  s->slots_.resize(kMaxInFlight);
  for (Slot& slot : s->slots_) {
    MEMPIPE_ASSIGN_OR_RETURN(slot.done, GpuEventOwner::Create());
  }
  return s;
}

absl::Status GpuPageSelector::Reserve(DeviceBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes) return absl::OkStatus();
  MEMPIPE_ASSIGN_OR_RETURN(buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  return absl::OkStatus();
}

absl::Status GpuPageSelector::Reserve(PinnedHostBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes) return absl::OkStatus();
  MEMPIPE_ASSIGN_OR_RETURN(buf, PinnedHostBuffer::Allocate(std::max<size_t>(bytes, 16)));
  return absl::OkStatus();
}

absl::StatusOr<GpuPageSelector::Layer*> GpuPageSelector::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return &it->second;
}

absl::StatusOr<DigestView> GpuPageSelector::DeviceDigests(int layer) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  return l->View();
}

absl::Status GpuPageSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  Layer l;
  l.shape = shape;
  MEMPIPE_ASSIGN_OR_RETURN(l.digests, DeviceBuffer::Allocate(l.View().NumBytes()));
  if (shape.digest_format == DigestFormat::kInt8) {
    MEMPIPE_ASSIGN_OR_RETURN(l.scales, DeviceBuffer::Allocate(l.View().ScaleBytes()));
    MEMPIPE_ASSIGN_OR_RETURN(l.exact, DeviceBuffer::Allocate(l.View().ExactBytes()));
  }
  layers_.emplace(layer, std::move(l));
  return absl::OkStatus();
}

absl::Status GpuPageSelector::BuildDigests(int layer, const KvCacheView& cache,
                                           const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  const absl::Time t0 = absl::Now();
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, l->View()));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_cache, DeviceBuffer::Allocate(cache.NumBytes()));
  const size_t cells = static_cast<size_t>(table.num_seqs) * table.max_blocks_per_seq;
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_table, DeviceBuffer::Allocate(cells * 4));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_lens, DeviceBuffer::Allocate(table.num_seqs * 4));
  MEMPIPE_RETURN_IF_ERROR(d_cache.CopyFromHost(cache.data, cache.NumBytes()));
  MEMPIPE_RETURN_IF_ERROR(d_table.CopyFromHost(table.block_table, cells * 4));
  MEMPIPE_RETURN_IF_ERROR(d_lens.CopyFromHost(table.seq_lens, table.num_seqs * 4));
  KvCacheView dcache = cache;
  dcache.data = d_cache.data();
  const BlockTableView dtable{static_cast<const int32_t*>(d_table.data()),
                              static_cast<const int32_t*>(d_lens.data()), table.num_seqs,
                              table.max_blocks_per_seq};
  MEMPIPE_RETURN_IF_ERROR(BuildDigestsGpu(dcache, dtable, l->View(), stream_.get()));
  MEMPIPE_RETURN_IF_ERROR(stream_.Synchronize());  // the temporaries die here
  costs_ = SelectorCosts{};
  costs_.prepare_ms = costs_.host_ms = MsSince(t0);
  return absl::OkStatus();
}

absl::Status GpuPageSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                         const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  const absl::Time t0 = absl::Now();
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (slots == nullptr || keys == nullptr) {
    return absl::InvalidArgumentError("slots and keys must not be null");
  }
  // The CPU's check of the slots (host memory): a slot past the cache names token and slot.
  const int64_t num_slots = static_cast<int64_t>(l->shape.num_blocks) * l->shape.block_size;
  for (int i = 0; i < num_tokens; ++i) {
    if (slots[i] >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", i, "] = ", slots[i],
                                                     " is past the cache (", num_slots, " slots)"));
    }
  }
  const CacheShape& sh = l->shape;
  const size_t key_bytes =
      static_cast<size_t>(num_tokens) * sh.num_kv_heads * sh.head_dim * DTypeSize(sh.dtype);
  const KvCacheView shapes{l->digests.data(), sh.dtype,        sh.num_blocks,
                           sh.block_size,     sh.num_kv_heads, sh.head_dim};
  // The previous append may still read these buffers: wait for the stream before reuse.
  MEMPIPE_RETURN_IF_ERROR(stream_.Synchronize());
  MEMPIPE_RETURN_IF_ERROR(Reserve(append_ws_, AppendWorkspaceBytes(shapes)));
  MEMPIPE_RETURN_IF_ERROR(Reserve(append_slots_, num_tokens * sizeof(int64_t)));
  MEMPIPE_RETURN_IF_ERROR(Reserve(append_keys_, key_bytes));
  MEMPIPE_RETURN_IF_ERROR(
      CopyToDeviceAsync(append_slots_.data(), slots, num_tokens * sizeof(int64_t), stream_.get()));
  MEMPIPE_RETURN_IF_ERROR(CopyToDeviceAsync(append_keys_.data(), keys, key_bytes, stream_.get()));
  MEMPIPE_RETURN_IF_ERROR(UpdateDigestsFromKeysGpu(
      l->View(), sh.block_size, static_cast<const int64_t*>(append_slots_.data()), num_tokens,
      append_keys_.data(), append_ws_.data(), append_ws_.size(), stream_.get()));
  costs_ = SelectorCosts{};
  costs_.prepare_ms = costs_.host_ms = MsSince(t0);
  return absl::OkStatus();
}

absl::StatusOr<SelectTicket> GpuPageSelector::Submit(const SelectRequest& request) {
  MEMPIPE_RETURN_IF_ERROR(Find(request.layer).status());  // as the CPU selector: at once
  absl::StatusOr<SelectTicket> queued = Queue(request);
  if (queued.ok() || queued.status().code() == absl::StatusCode::kResourceExhausted) {
    return queued;
  }
  const SelectTicket ticket = next_ticket_++;
  failed_.emplace(ticket, queued.status());
  return ticket;
}

absl::StatusOr<SelectTicket> GpuPageSelector::Queue(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(request.layer));
  const absl::Time t0 = absl::Now();
  const CacheShape& sh = l->shape;
  const KvCacheView geometry = sh.Geometry();
  // The CPU selector's checks, on the same host inputs.
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(request.config, sh.block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(request.config, "the GPU selector"));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(request.table, sh.block_size, sh.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateQuery(request.query, geometry, request.table));
  if (request.query.dtype != sh.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("query dtype ", DTypeName(request.query.dtype),
                                                   " differs from the layer's ",
                                                   DTypeName(sh.dtype)));
  }
  const SelectionView& out = request.out;
  const int k = request.config.PagesPerHead(sh.block_size);
  if (out.pages == nullptr || out.counts == nullptr || out.num_seqs != request.table.num_seqs ||
      out.num_kv_heads != sh.num_kv_heads || out.max_selected < k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection is [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected, "]; need [",
        request.table.num_seqs, ", ", sh.num_kv_heads, ", >= ", k, "] with non-null pointers"));
  }
  int free_slot = -1;
  for (int i = 0; i < kMaxInFlight && free_slot < 0; ++i) {
    Slot& c = slots_[i];
    if (c.busy && c.abandoned) {
      absl::StatusOr<bool> done = c.done.Query();
      if (done.ok() && *done) c.busy = c.abandoned = false;
    }
    if (!c.busy) free_slot = i;
  }
  if (free_slot < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("GpuPageSelector: ", kMaxInFlight, " requests already in flight"));
  }
  Slot& slot = slots_[free_slot];
  const QueryView& q = request.query;
  const BlockTableView& t = request.table;
  const size_t q_bytes =
      static_cast<size_t>(q.num_seqs) * q.num_heads * q.head_dim * DTypeSize(q.dtype);
  const size_t cells = static_cast<size_t>(t.num_seqs) * t.max_blocks_per_seq;
  const size_t sel_cells = static_cast<size_t>(out.num_seqs) * out.num_kv_heads;
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.query, q_bytes));
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.block_table, cells * 4));
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.seq_lens, t.num_seqs * 4));
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.pages, sel_cells * out.max_selected * 4));
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.counts, sel_cells * 4));
  const BlockTableView dtable{static_cast<const int32_t*>(slot.block_table.data()),
                              static_cast<const int32_t*>(slot.seq_lens.data()), t.num_seqs,
                              t.max_blocks_per_seq};
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.workspace, SelectWorkspaceBytes(dtable, sh.num_kv_heads)));
  const size_t sel_bytes = sel_cells * (out.max_selected + 1) * 4;
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.staging_in, q_bytes + (cells + t.num_seqs) * 4));
  MEMPIPE_RETURN_IF_ERROR(Reserve(slot.staging_out, sel_bytes));
  auto* in = static_cast<uint8_t*>(slot.staging_in.data());
  std::memcpy(in, q.data, q_bytes);
  std::memcpy(in + q_bytes, t.block_table, cells * 4);
  std::memcpy(in + q_bytes + cells * 4, t.seq_lens, t.num_seqs * 4);
  const GpuStream s = stream_.get();
  MEMPIPE_RETURN_IF_ERROR(CopyToDeviceAsync(slot.query.data(), in, q_bytes, s));
  MEMPIPE_RETURN_IF_ERROR(CopyToDeviceAsync(slot.block_table.data(), in + q_bytes, cells * 4, s));
  MEMPIPE_RETURN_IF_ERROR(
      CopyToDeviceAsync(slot.seq_lens.data(), in + q_bytes + cells * 4, t.num_seqs * 4, s));
  QueryView dq = q;
  dq.data = slot.query.data();
  KvCacheView dgeometry = geometry;
  dgeometry.data = nullptr;  // steps 2-3 read the digests only
  const SelectionView dout{static_cast<int32_t*>(slot.pages.data()),
                           static_cast<int32_t*>(slot.counts.data()), out.num_seqs,
                           out.num_kv_heads, out.max_selected};
  MEMPIPE_RETURN_IF_ERROR(ScoreAndSelectGpu(dq, dgeometry, l->View(), dtable, request.config, dout,
                                            slot.workspace.data(), slot.workspace.size(), s));
  auto* staged = static_cast<uint8_t*>(slot.staging_out.data());
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostAsync(staged, slot.pages.data(), sel_cells * out.max_selected * 4, s));
  MEMPIPE_RETURN_IF_ERROR(CopyToHostAsync(staged + sel_cells * out.max_selected * 4,
                                          slot.counts.data(), sel_cells * 4, s));
  MEMPIPE_RETURN_IF_ERROR(slot.done.Record(s));
  slot.busy = true;
  const SelectTicket ticket = next_ticket_++;
  pending_.emplace(ticket, Pending{free_slot, t0, out});
  return ticket;
}

absl::Status GpuPageSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  if (auto f = failed_.find(ticket); f != failed_.end()) {
    absl::Status status = std::move(f->second);
    failed_.erase(f);
    return status;
  }
  auto it = pending_.find(ticket);
  if (it == pending_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  Slot& slot = slots_[it->second.slot];
  while (true) {
    absl::StatusOr<bool> done = slot.done.Query();
    if (!done.ok() || *done) {
      const absl::Time submitted = it->second.submitted;
      const SelectionView out = it->second.out;
      slot.busy = false;
      pending_.erase(it);
      if (!done.ok()) return done.status();
      const size_t cells = static_cast<size_t>(out.num_seqs) * out.num_kv_heads;
      const auto* staged = static_cast<const uint8_t*>(slot.staging_out.data());
      std::memcpy(out.pages, staged, cells * out.max_selected * 4);
      std::memcpy(out.counts, staged + cells * out.max_selected * 4, cells * 4);
      costs_ = SelectorCosts{};
      costs_.host_ms = MsSince(submitted);
      return absl::OkStatus();
    }
    if (absl::Now() >= deadline) {
      // The result is discarded (it lands in the slot's staging memory, never in the
      // request's view); the slot is reused once its event completes.
      slot.abandoned = true;
      pending_.erase(it);
      return absl::DeadlineExceededError(
          absl::StrCat("GPU selection ticket ", ticket, " not done by the deadline"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace mempipe
