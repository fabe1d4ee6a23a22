#include "backend/gpu/gpu_selection_offload.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

int64_t MsToNs(double ms) { return static_cast<int64_t>(ms * 1e6); }

}  // namespace

absl::StatusOr<std::unique_ptr<GpuSelectionOffload>> GpuSelectionOffload::Create(
    std::unique_ptr<PageSelector> selector, SelectionOffloadOptions options) {
  if (GpuDeviceCount() == 0) return absl::UnavailableError("GpuSelectionOffload: no GPU present");
  options.device_staging = true;
  std::unique_ptr<GpuSelectionOffload> g(new GpuSelectionOffload());
  MEMPIPE_ASSIGN_OR_RETURN(g->engine_, SelectionOffload::Create(std::move(selector), options,
                                                                offload_gpu::MappedHostMemory()));
  const size_t gates = static_cast<size_t>(options.slots) + options.max_layers;
  const size_t bytes = OffloadDeviceCounters::kCount * sizeof(unsigned long long) +
                       options.slots * sizeof(int64_t) + gates * sizeof(int32_t);
  MEMPIPE_ASSIGN_OR_RETURN(g->state_, DeviceBuffer::Allocate(bytes));
  const std::vector<uint8_t> zeros(bytes, 0);
  MEMPIPE_RETURN_IF_ERROR(g->state_.CopyFromHost(zeros.data(), bytes));
  auto* base = static_cast<uint8_t*>(g->state_.data());
  g->counters_ = reinterpret_cast<unsigned long long*>(base);
  base += OffloadDeviceCounters::kCount * sizeof(unsigned long long);
  g->stamp_ns_ = reinterpret_cast<int64_t*>(base);
  base += options.slots * sizeof(int64_t);
  g->gate_ok_ = reinterpret_cast<int32_t*>(base);
  return g;
}

GpuSelectionOffload::~GpuSelectionOffload() { Shutdown(); }

void GpuSelectionOffload::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Host functions still queued on some stream refer to this object and the engine.
  (void)GpuSynchronize();
  engine_->Shutdown();
}

absl::StatusOr<GpuSelectionOffload::IssueRecord*> GpuSelectionOffload::TakeRecord(
    GpuStream stream) {
  MEMPIPE_ASSIGN_OR_RETURN(const bool capturing, offload_gpu::IsCapturing(stream));
  std::lock_guard<std::mutex> lock(records_mu_);
  IssueRecord* r = nullptr;
  if (!free_records_.empty()) {
    r = free_records_.back();
    free_records_.pop_back();
  } else {
    records_.push_back(std::make_unique<IssueRecord>());
    r = records_.back().get();
  }
  r->owner = this;
  // A captured host function runs at every replay of the graph: its record is never recycled.
  r->persistent = capturing;
  return r;
}

void GpuSelectionOffload::ReturnRecord(IssueRecord* record) {
  std::lock_guard<std::mutex> lock(records_mu_);
  free_records_.push_back(record);
}

void GpuSelectionOffload::IssueHost(void* data) {
  auto* r = static_cast<IssueRecord*>(data);
  if (r->select) {
    r->owner->engine_->IssueSelect(r->select_plan);
  } else {
    r->owner->engine_->IssueAppend(r->append_plan);
  }
  if (!r->persistent) r->owner->ReturnRecord(r);
}

absl::Status GpuSelectionOffload::Append(int layer, const int64_t* slots, int num_tokens,
                                         const void* keys, GpuStream stream) {
  if (num_tokens > 0 && (slots == nullptr || keys == nullptr)) {
    return absl::InvalidArgumentError("slots and keys must not be null");
  }
  MEMPIPE_ASSIGN_OR_RETURN(const bool capturing, offload_gpu::IsCapturing(stream));
  MEMPIPE_ASSIGN_OR_RETURN(SelectionOffload::AppendPlan p,
                           engine_->PlanAppend(layer, num_tokens, !capturing));
  const int gate = static_cast<int>(p.control - engine_->slot_control(0));
  auto* control = static_cast<OffloadSlotControl*>(engine_->memory().device_pointer(p.control));
  auto* dst = static_cast<uint8_t*>(engine_->memory().device_pointer(p.slots));
  if (control == nullptr || dst == nullptr) {
    return absl::InternalError("no device address for the offload's mapped host memory");
  }
  // The layer's ring: the gate waits (stream-ordered, at most append_timeout_ms) only when
  // every entry is still held, and picks the entry the host function will hand over.
  const int64_t timeout = MsToNs(engine_->append_timeout_ms());
  MEMPIPE_RETURN_IF_ERROR(
      offload_gpu::LaunchGate(control, gate_ok_ + gate, nullptr, timeout, p.ring, stream));
  const offload_gpu::CopySegment seg[2] = {{slots, dst, num_tokens * sizeof(int64_t)},
                                           {keys, dst + (p.keys - p.slots), p.key_bytes}};
  MEMPIPE_RETURN_IF_ERROR(
      offload_gpu::LaunchStageCopy(seg, 2, gate_ok_ + gate, p.entry_bytes, stream));
  MEMPIPE_ASSIGN_OR_RETURN(IssueRecord * r, TakeRecord(stream));
  r->select = false;
  r->append_plan = p;
  return offload_gpu::LaunchHostFunction(stream, &GpuSelectionOffload::IssueHost, r);
}

absl::Status GpuSelectionOffload::Submit(int slot, int layer, const QueryView& query,
                                         const BlockTableView& table, const SelectionConfig& config,
                                         GpuStream stream) {
  if (query.data == nullptr || table.block_table == nullptr || table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("query, block_table and seq_lens must not be null");
  }
  MEMPIPE_ASSIGN_OR_RETURN(const bool capturing, offload_gpu::IsCapturing(stream));
  MEMPIPE_ASSIGN_OR_RETURN(SelectionOffload::SelectPlan p,
                           engine_->PlanSelect(slot, layer, query, table, config, !capturing));
  const SelectionOffload::Staging& st = p.staging;
  auto* control = static_cast<OffloadSlotControl*>(engine_->memory().device_pointer(p.control));
  auto* base = static_cast<uint8_t*>(engine_->memory().device_pointer(st.base));
  if (control == nullptr || base == nullptr) {
    return absl::InternalError("no device address for the offload's mapped host memory");
  }
  const int64_t timeout = MsToNs(engine_->gate_timeout_ms());
  MEMPIPE_RETURN_IF_ERROR(offload_gpu::LaunchGate(control, gate_ok_ + slot, stamp_ns_ + slot,
                                                  timeout, /*ring=*/1, stream));
  const size_t s = table.num_seqs;
  const offload_gpu::CopySegment seg[3] = {
      {query.data, base + st.query, s * query.num_heads * query.head_dim * DTypeSize(query.dtype)},
      {table.block_table, base + st.table, s * table.max_blocks_per_seq * sizeof(int32_t)},
      {table.seq_lens, base + st.lens, s * sizeof(int32_t)}};
  MEMPIPE_RETURN_IF_ERROR(
      offload_gpu::LaunchStageCopy(seg, 3, gate_ok_ + slot, /*entry_bytes=*/0, stream));
  MEMPIPE_ASSIGN_OR_RETURN(IssueRecord * r, TakeRecord(stream));
  r->select = true;
  r->select_plan = p;
  return offload_gpu::LaunchHostFunction(stream, &GpuSelectionOffload::IssueHost, r);
}

absl::Status GpuSelectionOffload::Wait(int slot, const SelectionView& out, int32_t* status,
                                       GpuStream stream) {
  if (status == nullptr) return absl::InvalidArgumentError("status must not be null");
  MEMPIPE_ASSIGN_OR_RETURN(SelectionOffload::SelectPlan p, engine_->PlanWait(slot));
  const int s = p.table.num_seqs, kvh = p.num_kv_heads, k = p.pages_per_head;
  if (out.pages == nullptr || out.counts == nullptr || out.num_seqs != s ||
      out.num_kv_heads != kvh || out.max_selected < k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the selection must be [", s, ", ", kvh, ", >= ", k, "] pages and [", s, ", ", kvh,
        "] counts, got [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected, "]"));
  }
  auto* base = static_cast<uint8_t*>(engine_->memory().device_pointer(p.staging.base));
  offload_gpu::WaitArgs a;
  a.control = static_cast<const OffloadSlotControl*>(engine_->memory().device_pointer(p.control));
  if (a.control == nullptr || base == nullptr) {
    return absl::InternalError("no device address for the offload's mapped host memory");
  }
  a.stamp_ns = stamp_ns_ + slot;
  a.deadline_ns = MsToNs(engine_->deadline_ms());
  a.staged_pages = reinterpret_cast<const int32_t*>(base + p.staging.pages);
  a.staged_counts = reinterpret_cast<const int32_t*>(base + p.staging.counts);
  a.rows = s * kvh;
  a.k = k;
  a.out_pages = out.pages;
  a.out_counts = out.counts;
  a.max_selected = out.max_selected;
  a.status = status;
  a.counters = counters_;
  return offload_gpu::LaunchWait(a, stream);
}

absl::StatusOr<OffloadMetrics> GpuSelectionOffload::Metrics(double* gpu_wait_ms) {
  unsigned long long c[OffloadDeviceCounters::kCount] = {};
  // DeviceBuffer::CopyToHost copies from the start of the buffer: the counters come first.
  MEMPIPE_RETURN_IF_ERROR(state_.CopyToHost(c, sizeof(c)));
  OffloadMetrics m = engine_->Metrics();
  m.waits = 0;
  for (int r = 0; r < kNumOffloadReasons; ++r) {
    m.waited[r] = static_cast<int64_t>(c[OffloadDeviceCounters::kWaited + r]);
    m.waits += m.waited[r];
  }
  m.bytes_h2d = static_cast<double>(c[OffloadDeviceCounters::kSelectionBytes]);
  if (gpu_wait_ms != nullptr) {
    *gpu_wait_ms = static_cast<double>(c[OffloadDeviceCounters::kWaitNs]) * 1e-6;
  }
  return m;
}

absl::Status GpuSelectionOffload::ResetMetrics() {
  const unsigned long long zeros[OffloadDeviceCounters::kCount] = {};
  MEMPIPE_RETURN_IF_ERROR(state_.CopyFromHost(zeros, sizeof(zeros)));
  engine_->ResetMetrics();
  return absl::OkStatus();
}

}  // namespace mempipe
