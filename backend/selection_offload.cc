#include "backend/selection_offload.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/dtype.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

constexpr size_t kAlign = 64;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

Clock::duration MsDuration(double ms) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(ms));
}

absl::Time ToAbslDeadline(Clock::time_point deadline) {
  const Clock::duration left = deadline - Clock::now();
  return absl::Now() + absl::FromChrono(std::max(left, Clock::duration::zero()));
}

}  // namespace

size_t SelectionOffload::InputBytes(const SelectPlan& p) {
  const size_t s = p.table.num_seqs;
  return s * p.query.num_heads * p.query.head_dim * DTypeSize(p.query.dtype) +
         s * p.table.max_blocks_per_seq * sizeof(int32_t) + s * sizeof(int32_t);
}

absl::string_view OffloadReasonName(OffloadReason reason) {
  switch (reason) {
    case OffloadReason::kSelected:
      return "selected";
    case OffloadReason::kTimeout:
      return "timeout";
    case OffloadReason::kError:
      return "error";
    case OffloadReason::kDead:
      return "dead";
    case OffloadReason::kInvalid:
      return "invalid";
    case OffloadReason::kBusy:
      return "busy";
  }
  return "unknown";
}

OffloadHostMemory PlainHostMemory() {
  OffloadHostMemory m;
  m.allocate = [](size_t bytes) -> absl::StatusOr<void*> {
    return ::operator new(std::max<size_t>(bytes, 1), std::align_val_t(kAlign));
  };
  m.release = [](void* p) { ::operator delete(p, std::align_val_t(kAlign)); };
  m.device_pointer = [](void* p) { return p; };
  return m;
}

absl::Status ValidateSelectionOffloadOptions(const SelectionOffloadOptions& o) {
  if (o.slots < 1 || o.slots > (1 << 16)) {
    return absl::InvalidArgumentError(absl::StrCat("slots must be in [1, 65536], got ", o.slots));
  }
  if (!(o.deadline_ms > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("deadline_ms must be > 0, got ", o.deadline_ms));
  }
  if (o.dead_after_failures < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("dead_after_failures must be >= 1, got ", o.dead_after_failures));
  }
  if (o.max_layers < 1 || o.max_layers > (1 << 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_layers must be in [1, 65536], got ", o.max_layers));
  }
  if (o.gate_timeout_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gate_timeout_ms must be >= 0, got ", o.gate_timeout_ms));
  }
  if (o.append_ring < 1 || o.append_ring > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("append_ring must be in [1, 1024], got ", o.append_ring));
  }
  if (!(o.append_timeout_ms > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("append_timeout_ms must be > 0, got ", o.append_timeout_ms));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SelectionOffload>> SelectionOffload::Create(
    std::unique_ptr<PageSelector> selector, const SelectionOffloadOptions& options,
    OffloadHostMemory memory) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionOffloadOptions(options));
  if (selector == nullptr) return absl::InvalidArgumentError("selector must not be null");
  if (!memory.allocate || !memory.release || !memory.device_pointer) {
    return absl::InvalidArgumentError("host memory functions must all be set");
  }
  const size_t count = static_cast<size_t>(options.slots) + options.max_layers;
  MEMPIPE_ASSIGN_OR_RETURN(void* raw, memory.allocate(count * sizeof(SlotControl)));
  auto* controls = static_cast<SlotControl*>(raw);
  for (size_t i = 0; i < count; ++i) new (&controls[i]) SlotControl();
  return std::unique_ptr<SelectionOffload>(
      new SelectionOffload(std::move(selector), options, std::move(memory), controls));
}

SelectionOffload::SelectionOffload(std::unique_ptr<PageSelector> selector,
                                   const SelectionOffloadOptions& options, OffloadHostMemory memory,
                                   SlotControl* controls)
    : options_(options),
      selector_(std::move(selector)),
      memory_(std::move(memory)),
      controls_(controls),
      slot_staging_(options.slots),
      pending_(options.slots, false),
      slot_plan_(options.slots),
      submitted_at_(options.slots),
      channel_(options.channel_capacity > 0
                   ? options.channel_capacity
                   : 4 * static_cast<size_t>(options.slots) + 4 * options.max_layers) {
  metrics_.selector = std::string(selector_->Name());
  metrics_.append_ring = options.append_ring;
  thread_ = std::thread(&SelectionOffload::SelectorLoop, this);
}

SelectionOffload::~SelectionOffload() {
  Shutdown();
  for (Staging& s : slot_staging_) {
    if (s.base != nullptr) memory_.release(s.base);
  }
  for (auto& [id, layer] : layers_) {
    if (layer.append.base != nullptr) memory_.release(layer.append.base);
  }
  for (void* p : graveyard_) memory_.release(p);
  const size_t count = static_cast<size_t>(options_.slots) + options_.max_layers;
  for (size_t i = 0; i < count; ++i) controls_[i].~SlotControl();
  memory_.release(controls_);
}

void SelectionOffload::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  stopping_.store(true, std::memory_order_release);
  channel_.Close();
  if (thread_.joinable()) thread_.join();
}

bool SelectionOffload::Push(const Job& job) {
  std::lock_guard<std::mutex> lock(push_mu_);
  return channel_.TryPush(job);
}

absl::Status SelectionOffload::RunControl(std::function<absl::Status()> fn) {
  Control control;
  control.fn = std::move(fn);
  Job job;
  job.kind = JobKind::kControl;
  job.control = &control;
  // Setup only: retry a full channel instead of failing.
  for (;;) {
    if (channel_.closed()) {
      return absl::FailedPreconditionError("the selection offload was shut down");
    }
    if (Push(job)) break;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  std::unique_lock<std::mutex> lock(wake_mu_);
  wake_cv_.wait(lock, [&] { return control.done; });
  return control.status;
}

absl::Status SelectionOffload::AddLayer(int layer, const CacheShape& shape) {
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    if (shut_down_) return absl::FailedPreconditionError("the selection offload was shut down");
    if (layers_.count(layer)) {
      return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
    }
    if (static_cast<int>(layers_.size()) >= options_.max_layers) {
      return absl::ResourceExhaustedError(
          absl::StrCat("layer ", layer, " would exceed max_layers = ", options_.max_layers));
    }
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  MEMPIPE_RETURN_IF_ERROR(RunControl([&] { return selector_->AddLayer(layer, shape); }));
  std::lock_guard<std::mutex> lock(plan_mu_);
  LayerInfo& info = layers_[layer];
  info.shape = shape;
  info.index = static_cast<int>(layers_.size()) - 1;
  return absl::OkStatus();
}

absl::Status SelectionOffload::BuildDigests(int layer, const KvCacheView& cache,
                                            const BlockTableView& table) {
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    if (!layers_.count(layer)) {
      return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added"));
    }
  }
  const auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(RunControl([&]() -> absl::Status {
    const absl::Status s = selector_->BuildDigests(layer, cache, table);
    if (s.ok()) {
      const SelectorCosts c = selector_->Costs();
      std::lock_guard<std::mutex> lock(metrics_mu_);
      metrics_.modeled_device_ms += c.modeled_device_ms.value_or(0);
      metrics_.modeled_energy_mj += c.modeled_energy_mj.value_or(0);
    }
    return s;
  }));
  std::lock_guard<std::mutex> lock(metrics_mu_);
  metrics_.append_ms += MsSince(t0);
  return absl::OkStatus();
}

absl::StatusOr<SelectionOffload::Staging> SelectionOffload::Grow(Staging current, size_t need,
                                                                 bool may_allocate,
                                                                 absl::string_view what) {
  if (current.base != nullptr && current.bytes >= need) return current;
  if (!may_allocate) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " needs ", need, " bytes of staging and has ", current.bytes,
        "; pinned memory cannot be allocated while a graph is captured: run the step once "
        "uncaptured first (a warm-up)"));
  }
  MEMPIPE_ASSIGN_OR_RETURN(void* raw, memory_.allocate(need));
  // NOTE: the outgrown buffer may still be read or written by a late request of this slot;
  // it stays allocated until shutdown.
  if (current.base != nullptr) graveyard_.push_back(current.base);
  Staging s;
  s.base = static_cast<uint8_t*>(raw);
  s.bytes = need;
  return s;
}

absl::StatusOr<SelectionOffload::SelectPlan> SelectionOffload::PlanSelect(
    int slot, int layer, const QueryView& query, const BlockTableView& table,
    const SelectionConfig& config, bool may_allocate) {
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (shut_down_) return absl::FailedPreconditionError("the selection offload was shut down");
  if (slot < 0 || slot >= options_.slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot must be in [0, ", options_.slots, "), got ", slot));
  }
  if (pending_[slot]) {
    return absl::FailedPreconditionError(absl::StrCat(
        "slot ", slot, " has a request that was not waited for; wait(slot) before reusing it"));
  }
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " was not added"));
  }
  const CacheShape& sh = it->second.shape;
  if (query.dtype != sh.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("query dtype ", DTypeName(query.dtype),
                                                   " differs from layer ", layer, "'s cache dtype ",
                                                   DTypeName(sh.dtype)));
  }
  if (query.head_dim != sh.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query head_dim ", query.head_dim, " differs from layer ", layer, "'s ", sh.head_dim));
  }
  if (query.num_heads <= 0 || query.num_heads % sh.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("query num_heads must be a positive multiple of ", sh.num_kv_heads,
                     " KV heads, got ", query.num_heads));
  }
  if (table.num_seqs <= 0 || table.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("block_table must be non-empty, got [",
                                                   table.num_seqs, ", ", table.max_blocks_per_seq,
                                                   "]"));
  }
  if (query.num_seqs != table.num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query has ", query.num_seqs, " sequences but block_table has ", table.num_seqs));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, sh.block_size));
  SelectPlan p;
  p.slot = slot;
  p.layer = layer;
  p.config = config;
  p.pages_per_head = config.PagesPerHead(sh.block_size);
  p.num_kv_heads = sh.num_kv_heads;
  const size_t s = table.num_seqs, kvh = sh.num_kv_heads;
  const size_t q_bytes = s * query.num_heads * query.head_dim * DTypeSize(query.dtype);
  const size_t t_bytes = s * table.max_blocks_per_seq * sizeof(int32_t);
  const size_t l_bytes = s * sizeof(int32_t);
  const size_t p_bytes = s * kvh * p.pages_per_head * sizeof(int32_t);
  const size_t c_bytes = s * kvh * sizeof(int32_t);
  const size_t need =
      AlignUp(q_bytes) + AlignUp(t_bytes) + AlignUp(l_bytes) + AlignUp(p_bytes) + AlignUp(c_bytes);
  MEMPIPE_ASSIGN_OR_RETURN(
      Staging st, Grow(slot_staging_[slot], need, may_allocate, absl::StrCat("slot ", slot)));
  st.query = 0;
  st.table = st.query + AlignUp(q_bytes);
  st.lens = st.table + AlignUp(t_bytes);
  st.pages = st.lens + AlignUp(l_bytes);
  st.counts = st.pages + AlignUp(p_bytes);
  slot_staging_[slot] = st;
  p.staging = st;
  p.query = query;
  p.query.data = st.base + st.query;
  p.table = table;
  p.table.block_table = reinterpret_cast<const int32_t*>(st.base + st.table);
  p.table.seq_lens = reinterpret_cast<const int32_t*>(st.base + st.lens);
  p.control = &controls_[slot];
  pending_[slot] = true;
  slot_plan_[slot] = p;
  return p;
}

absl::StatusOr<SelectionOffload::SelectPlan> SelectionOffload::PlanWait(int slot) {
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (slot < 0 || slot >= options_.slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot must be in [0, ", options_.slots, "), got ", slot));
  }
  if (!pending_[slot]) {
    return absl::FailedPreconditionError(
        absl::StrCat("slot ", slot, " has no submitted request to wait for"));
  }
  pending_[slot] = false;
  return slot_plan_[slot];
}

absl::StatusOr<SelectionOffload::AppendPlan> SelectionOffload::PlanAppend(int layer, int num_tokens,
                                                                          bool may_allocate) {
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (shut_down_) return absl::FailedPreconditionError("the selection offload was shut down");
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " was not added"));
  }
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  LayerInfo& info = it->second;
  const CacheShape& sh = info.shape;
  const size_t s_bytes = static_cast<size_t>(num_tokens) * sizeof(int64_t);
  const size_t k_bytes =
      static_cast<size_t>(num_tokens) * sh.num_kv_heads * sh.head_dim * DTypeSize(sh.dtype);
  const size_t ring = static_cast<size_t>(options_.append_ring);
  const size_t entry = AlignUp(s_bytes) + AlignUp(k_bytes);
  if (info.append.base == nullptr || entry > info.entry_bytes) {
    // A new ring with a larger stride (entries of one ring never move: a late append may still
    // read an entry of the old one, which stays allocated until shutdown).
    const size_t stride = std::max({entry, info.entry_bytes, kAlign});
    MEMPIPE_ASSIGN_OR_RETURN(Staging st, Grow(Staging{}, stride * ring, may_allocate,
                                              absl::StrCat("layer ", layer, "'s key append ring")));
    if (info.append.base != nullptr) graveyard_.push_back(info.append.base);
    info.append = st;
    info.entry_bytes = stride;
  }
  AppendPlan p;
  p.layer = layer;
  p.num_tokens = num_tokens;
  p.slots = info.append.base;
  p.keys = info.append.base + AlignUp(s_bytes);
  p.key_bytes = k_bytes;
  p.ring = options_.append_ring;
  p.entry_bytes = info.entry_bytes;
  p.control = &controls_[options_.slots + info.index];
  return p;
}

void SelectionOffload::IssueSelect(const SelectPlan& plan) {
  SlotControl& c = *plan.control;
  const uint32_t seq = c.issued.load(std::memory_order_relaxed) + 1;
  c.issued.store(seq, std::memory_order_release);
  if (c.skip.exchange(0, std::memory_order_acq_rel) != 0) {
    Publish(plan, seq, OffloadReason::kBusy);
    return;
  }
  if (dead_.load(std::memory_order_acquire)) {
    Publish(plan, seq, OffloadReason::kDead);
    return;
  }
  const uint32_t previous_holder = c.holder.load(std::memory_order_relaxed);
  c.holder.store(seq, std::memory_order_release);
  Job job;
  job.kind = JobKind::kSelect;
  job.seq = seq;
  job.select = plan;
  job.issued = Clock::now();
  if (!Push(job)) {
    // Nobody reads these inputs: the previous holder (already released) stays the holder.
    c.holder.store(previous_holder, std::memory_order_release);
    Publish(plan, seq, OffloadReason::kBusy);
    return;
  }
  if (options_.device_staging) {
    const size_t bytes = InputBytes(plan);
    std::lock_guard<std::mutex> lock(metrics_mu_);
    metrics_.bytes_d2h += static_cast<double>(bytes);
  }
}

void SelectionOffload::IssueAppend(const AppendPlan& plan) {
  SlotControl& c = *plan.control;
  const uint32_t seq = c.issued.load(std::memory_order_relaxed) + 1;
  c.issued.store(seq, std::memory_order_release);
  if (c.skip.exchange(0, std::memory_order_acq_rel) != 0) {
    Die("append",
        absl::UnavailableError(absl::StrCat(
            "layer ", plan.layer, ": no entry of its ring of ", plan.ring,
            " key-append stagings came free within append_timeout_ms = ", append_timeout_ms(),
            " (the card stopped consuming keys), so new keys could not reach the selector and "
            "its digests would go stale")));
    return;
  }
  if (dead_.load(std::memory_order_acquire)) return;
  const uint32_t previous_holder = c.holder.load(std::memory_order_relaxed);
  c.holder.store(seq, std::memory_order_release);
  Job job;
  job.kind = JobKind::kAppend;
  job.seq = seq;
  job.append = plan;
  const size_t offset = static_cast<size_t>(OffloadRingEntry(seq, plan.ring)) * plan.entry_bytes;
  job.append.slots += offset;
  job.append.keys += offset;
  job.issued = Clock::now();
  if (!Push(job)) {
    c.holder.store(previous_holder, std::memory_order_release);
    Die("append", absl::ResourceExhaustedError(
                      absl::StrCat("layer ", plan.layer,
                                   ": the selector's channel was full, new keys were dropped and "
                                   "its digests would go stale")));
    return;
  }
  if (options_.device_staging) {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    metrics_.bytes_d2h += static_cast<double>(plan.key_bytes + plan.num_tokens * sizeof(int64_t));
  }
}

void SelectionOffload::Publish(const SelectPlan& plan, uint32_t seq, OffloadReason reason) {
  SlotControl& c = *plan.control;
  const uint64_t value = (static_cast<uint64_t>(seq) << 32) | static_cast<uint32_t>(reason);
  uint64_t current = c.result.load(std::memory_order_relaxed);
  // Forward only (serial-number order, so the 32-bit sequence may wrap).
  while (static_cast<int32_t>(seq - ResultSeq(current)) > 0 &&
         !c.result.compare_exchange_weak(current, value, std::memory_order_release,
                                         std::memory_order_relaxed)) {
  }
  {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    ++metrics_.requests;
    ++metrics_.published[static_cast<int>(reason)];
  }
  // NOTE: an empty critical section orders the store above before a waiter's predicate check,
  // so the notify cannot fall between its check and its sleep.
  { std::lock_guard<std::mutex> lock(wake_mu_); }
  wake_cv_.notify_all();
}

void SelectionOffload::Fail(absl::string_view what, const absl::Status& status) {
  if (++consecutive_failures_ >= options_.dead_after_failures) Die(what, status);
}

void SelectionOffload::Die(absl::string_view what, const absl::Status& status) {
  if (!dead_.exchange(true, std::memory_order_acq_rel)) {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    metrics_.dead = true;
    metrics_.death = absl::StrCat(what, ": ", status.ToString());
  }
}

void SelectionOffload::SelectorLoop() {
  while (std::optional<Job> job = channel_.Pop()) {
    switch (job->kind) {
      case JobKind::kControl: {
        absl::Status s;
        try {
          s = job->control->fn();
        } catch (const std::exception& e) {
          s = absl::InternalError(absl::StrCat("selector threw: ", e.what()));
        } catch (...) {
          s = absl::InternalError("selector threw a non-standard exception");
        }
        {
          std::lock_guard<std::mutex> lock(wake_mu_);
          job->control->status = s;
          job->control->done = true;
        }
        wake_cv_.notify_all();
        break;
      }
      case JobKind::kAppend:
        RunAppend(*job);
        break;
      case JobKind::kSelect:
        RunSelect(*job);
        break;
    }
  }
}

void SelectionOffload::RunAppend(const Job& job) {
  const AppendPlan& p = job.append;
  if (!dead_.load(std::memory_order_acquire)) {
    const auto t0 = Clock::now();
    absl::Status s;
    try {
      s = selector_->AppendKeys(p.layer, reinterpret_cast<const int64_t*>(p.slots), p.num_tokens,
                                p.keys);
    } catch (const std::exception& e) {
      s = absl::InternalError(absl::StrCat("selector threw: ", e.what()));
    } catch (...) {
      s = absl::InternalError("selector threw a non-standard exception");
    }
    if (!s.ok()) {
      // Digests that missed keys cannot be trusted again.
      Die("append", s);
    } else {
      const SelectorCosts c = selector_->Costs();
      std::lock_guard<std::mutex> lock(metrics_mu_);
      ++metrics_.appends;
      metrics_.appended_tokens += p.num_tokens;
      metrics_.append_ms += MsSince(t0);
      metrics_.modeled_device_ms += c.modeled_device_ms.value_or(0);
      metrics_.modeled_energy_mj += c.modeled_energy_mj.value_or(0);
      metrics_.bytes_to_card += static_cast<double>(p.key_bytes + p.num_tokens * sizeof(int64_t));
    }
  }
  p.control->released.store(job.seq, std::memory_order_release);
  last_job_end_ = Clock::now();
  { std::lock_guard<std::mutex> lock(wake_mu_); }
  wake_cv_.notify_all();
}

void SelectionOffload::RunSelect(const Job& job) {
  const SelectPlan& p = job.select;
  const Clock::time_point deadline = job.issued + MsDuration(options_.deadline_ms);
  OffloadReason reason = OffloadReason::kSelected;
  absl::Status failure;
  const size_t s = p.table.num_seqs, kvh = p.num_kv_heads;
  SelectionView out{reinterpret_cast<int32_t*>(p.staging.base + p.staging.pages),
                    reinterpret_cast<int32_t*>(p.staging.base + p.staging.counts), p.table.num_seqs,
                    p.num_kv_heads, p.pages_per_head};
  SelectorCosts costs;
  double wall_ms = 0;
  // The request queued behind earlier work (the selector was still busy when it was issued)
  // and had less than half its deadline left when it started: the card was behind.
  const bool late_start =
      job.issued < last_job_end_ && deadline - Clock::now() < MsDuration(options_.deadline_ms / 2);
  if (dead_.load(std::memory_order_acquire)) {
    reason = OffloadReason::kDead;
  } else if (Clock::now() >= deadline) {
    reason = OffloadReason::kTimeout;
    failure = absl::DeadlineExceededError("the request expired in the selector's queue");
  } else {
    SelectRequest r;
    r.layer = p.layer;
    r.query = p.query;
    r.table = p.table;
    r.config = p.config;
    r.out = out;
    const auto t0 = Clock::now();
    try {
      absl::StatusOr<SelectTicket> ticket = selector_->Submit(r);
      failure = ticket.ok() ? selector_->Wait(*ticket, ToAbslDeadline(deadline)) : ticket.status();
    } catch (const std::exception& e) {
      failure = absl::InternalError(absl::StrCat("selector threw: ", e.what()));
    } catch (...) {
      failure = absl::InternalError("selector threw a non-standard exception");
    }
    wall_ms = MsSince(t0);
    if (absl::IsDeadlineExceeded(failure)) {
      reason = OffloadReason::kTimeout;
    } else if (!failure.ok()) {
      reason = OffloadReason::kError;
    } else {
      costs = selector_->Costs();
      // Block size from the layer: k pages of block_size tokens each.
      const int block_size = p.config.budget_tokens / p.pages_per_head;
      failure = ValidateSelection(out, p.table, block_size, p.config);
      if (!failure.ok()) reason = OffloadReason::kInvalid;
    }
  }
  p.control->released.store(job.seq, std::memory_order_release);
  last_job_end_ = Clock::now();  // before the publish: a request issued after it sees it
  const bool late = reason == OffloadReason::kTimeout && late_start;
  if (reason == OffloadReason::kSelected) {
    consecutive_failures_ = 0;
  } else if (reason != OffloadReason::kDead && !late) {
    Fail(absl::StrCat("select (slot ", p.slot, ", layer ", p.layer, ", ", OffloadReasonName(reason),
                      ")"),
         failure);
  }
  {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    metrics_.selector_ms += wall_ms;
    if (late) ++metrics_.late_timeouts;
    if (reason == OffloadReason::kSelected) {
      metrics_.functional_ms += costs.relevancy_ms;
      if (costs.modeled_device_ms) {
        metrics_.modeled_device_ms += *costs.modeled_device_ms;
        if (costs.relevancy_ms > *costs.modeled_device_ms) ++metrics_.host_bound;
      }
      metrics_.modeled_energy_mj += costs.modeled_energy_mj.value_or(0);
    }
    if (reason != OffloadReason::kDead) {
      metrics_.bytes_to_card += static_cast<double>(InputBytes(p));
      metrics_.bytes_from_card +=
          static_cast<double>(s * kvh * (p.pages_per_head + 1) * sizeof(int32_t));
    }
  }
  Publish(p, job.seq, reason);
}

bool SelectionOffload::PassGate(const SlotControl& control, int ring, double timeout_ms) const {
  const auto ready = [&] {
    return OffloadGateOpen(control.issued.load(std::memory_order_acquire),
                           control.holder.load(std::memory_order_acquire),
                           control.released.load(std::memory_order_acquire),
                           static_cast<uint32_t>(ring));
  };
  std::unique_lock<std::mutex> lock(wake_mu_);
  return wake_cv_.wait_for(lock, std::chrono::duration<double, std::milli>(timeout_ms), ready);
}

absl::Status SelectionOffload::Append(int layer, const int64_t* slots, int num_tokens,
                                      const void* keys) {
  if (num_tokens > 0 && (slots == nullptr || keys == nullptr)) {
    return absl::InvalidArgumentError("slots and keys must not be null");
  }
  std::lock_guard<std::mutex> serial(append_mu_);
  MEMPIPE_ASSIGN_OR_RETURN(AppendPlan p, PlanAppend(layer, num_tokens));
  if (!PassGate(*p.control, p.ring, append_timeout_ms())) {
    p.control->skip.store(1, std::memory_order_release);
  } else {
    // The entry this append's issue will take (the calls are serialized).
    const uint32_t seq = p.control->issued.load(std::memory_order_acquire) + 1;
    const size_t offset = static_cast<size_t>(OffloadRingEntry(seq, p.ring)) * p.entry_bytes;
    std::memcpy(p.slots + offset, slots, num_tokens * sizeof(int64_t));
    std::memcpy(p.keys + offset, keys, p.key_bytes);
  }
  IssueAppend(p);
  return absl::OkStatus();
}

absl::Status SelectionOffload::Submit(int slot, int layer, const QueryView& query,
                                      const BlockTableView& table, const SelectionConfig& config) {
  if (query.data == nullptr || table.block_table == nullptr || table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("query, block_table and seq_lens must not be null");
  }
  MEMPIPE_ASSIGN_OR_RETURN(SelectPlan p, PlanSelect(slot, layer, query, table, config));
  if (!PassGate(*p.control, /*ring=*/1, gate_timeout_ms())) {
    p.control->skip.store(1, std::memory_order_release);
  } else {
    std::memcpy(p.staging.base + p.staging.query, query.data, p.staging.table - p.staging.query);
    std::memcpy(p.staging.base + p.staging.table, table.block_table,
                static_cast<size_t>(table.num_seqs) * table.max_blocks_per_seq * sizeof(int32_t));
    std::memcpy(p.staging.base + p.staging.lens, table.seq_lens,
                static_cast<size_t>(table.num_seqs) * sizeof(int32_t));
  }
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    submitted_at_[slot] = Clock::now();
  }
  IssueSelect(p);
  return absl::OkStatus();
}

absl::StatusOr<OffloadReason> SelectionOffload::Wait(int slot, const SelectionView& out) {
  MEMPIPE_ASSIGN_OR_RETURN(SelectPlan p, PlanWait(slot));
  Clock::time_point submitted;
  {
    std::lock_guard<std::mutex> lock(plan_mu_);
    submitted = submitted_at_[slot];
  }
  const int s = p.table.num_seqs, kvh = p.num_kv_heads, k = p.pages_per_head;
  if (out.pages == nullptr || out.counts == nullptr || out.num_seqs != s ||
      out.num_kv_heads != kvh || out.max_selected < k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the selection must be [", s, ", ", kvh, ", >= ", k, "] pages and [", s, ", ", kvh,
        "] counts, got [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected, "]"));
  }
  const SlotControl& c = *p.control;
  const uint32_t expected = c.issued.load(std::memory_order_acquire);
  // A small grace past the deadline: the selector thread publishes the timeout itself.
  const Clock::time_point until = submitted + MsDuration(options_.deadline_ms + 10);
  uint64_t result = 0;
  const auto arrived = [&] {
    result = c.result.load(std::memory_order_acquire);
    return ResultSeq(result) == expected;
  };
  bool got;
  {
    std::unique_lock<std::mutex> lock(wake_mu_);
    got = wake_cv_.wait_until(lock, until, arrived);
  }
  const auto reason =
      got ? static_cast<OffloadReason>(ResultCode(result)) : OffloadReason::kTimeout;
  if (reason == OffloadReason::kSelected) {
    const int32_t* pages = reinterpret_cast<const int32_t*>(p.staging.base + p.staging.pages);
    const int32_t* counts = reinterpret_cast<const int32_t*>(p.staging.base + p.staging.counts);
    for (int i = 0; i < s * kvh; ++i) {
      int32_t* row = out.pages + static_cast<size_t>(i) * out.max_selected;
      std::copy_n(pages + static_cast<size_t>(i) * k, k, row);
      std::fill(row + k, row + out.max_selected, -1);
      out.counts[i] = counts[i];
    }
  }
  std::lock_guard<std::mutex> lock(metrics_mu_);
  ++metrics_.waits;
  ++metrics_.waited[static_cast<int>(reason)];
  return reason;
}

OffloadMetrics SelectionOffload::Metrics() const {
  std::lock_guard<std::mutex> lock(metrics_mu_);
  return metrics_;
}

void SelectionOffload::ResetMetrics() {
  std::lock_guard<std::mutex> lock(metrics_mu_);
  OffloadMetrics fresh;
  fresh.selector = metrics_.selector;
  fresh.dead = metrics_.dead;
  fresh.death = metrics_.death;
  fresh.append_ring = metrics_.append_ring;
  metrics_ = fresh;
}

}  // namespace mempipe
