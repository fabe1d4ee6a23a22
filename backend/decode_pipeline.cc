#include "backend/decode_pipeline.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <exception>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "attention/decode.h"
#include "core/clock.h"
#include "core/status_macros.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"

namespace mempipe {
namespace {

// A reused selection, extended by every page past its last entry up to the sequence's current
// last page, so the newest tokens are always attended (the local window of a fresh selection).
absl::Status ExtendToLastPage(const SelectionView& sel, const BlockTableView& table,
                              int block_size) {
  for (int s = 0; s < sel.num_seqs; ++s) {
    const int last = NumPages(table.seq_lens[s], block_size) - 1;
    for (int h = 0; h < sel.num_kv_heads; ++h) {
      int32_t* row = sel.Row(s, h);
      int32_t& count = sel.Count(s, h);
      for (int p = count > 0 ? row[count - 1] + 1 : 0; p <= last; ++p) {
        if (count >= sel.max_selected) {
          return absl::InternalError(
              absl::StrCat("reused selection of sequence ", s, " has no room for page ", p));
        }
        row[count++] = p;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view PipelineModeName(PipelineMode mode) {
  return mode == PipelineMode::kSync ? "sync" : "pipelined";
}

absl::StatusOr<PipelineMode> ParsePipelineMode(absl::string_view name) {
  if (name == "sync") return PipelineMode::kSync;
  if (name == "pipelined") return PipelineMode::kPipelined;
  return absl::InvalidArgumentError(
      absl::StrCat("pipeline mode must be sync or pipelined, got '", name, "'"));
}

absl::string_view SelectionSourceName(SelectionSource source) {
  switch (source) {
    case SelectionSource::kSelector:
      return "selector";
    case SelectionSource::kFallback:
      return "fallback";
    case SelectionSource::kReused:
      return "reused";
    case SelectionSource::kDense:
      return "dense";
  }
  return "unknown";
}

absl::string_view FallbackReasonName(FallbackReason reason) {
  switch (reason) {
    case FallbackReason::kNone:
      return "none";
    case FallbackReason::kTimeout:
      return "timeout";
    case FallbackReason::kError:
      return "error";
    case FallbackReason::kDead:
      return "dead";
    case FallbackReason::kExpired:
      return "expired";
    case FallbackReason::kInvalid:
      return "invalid";
  }
  return "unknown";
}

absl::Status ValidatePipelineOptions(const PipelineOptions& o) {
  MEMPIPE_RETURN_IF_ERROR(ValidatePlacement(o.placement));
  if (o.micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro_batches must be >= 1, got ", o.micro_batches));
  }
  if (o.mode == PipelineMode::kSync && o.micro_batches != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("mode sync takes one micro-batch, got micro_batches=", o.micro_batches,
                     " (use mode pipelined)"));
  }
  if (o.reuse < 1) {
    return absl::InvalidArgumentError(absl::StrCat("reuse must be >= 1, got ", o.reuse));
  }
  if (!(o.deadline_ms > 0) || !std::isfinite(o.deadline_ms)) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline_ms must be a positive number, got ", o.deadline_ms));
  }
  if (o.queue_capacity < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("queue_capacity must be >= 0, got ", o.queue_capacity));
  }
  if (o.dead_after_failures < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("dead_after_failures must be >= 1, got ", o.dead_after_failures));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateDenseLayers(o.policy.dense_layers));
  if (o.apply_threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("apply_threads must be >= 1, got ", o.apply_threads));
  }
  if (!(o.scale >= 0) || !std::isfinite(o.scale)) {
    return absl::InvalidArgumentError(absl::StrCat("scale must be >= 0, got ", o.scale));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DecodePipeline>> DecodePipeline::Create(
    const PipelineOptions& options, std::vector<KvCacheView> caches, int num_heads,
    int max_num_seqs, std::unique_ptr<PageSelector> selector) {
  MEMPIPE_RETURN_IF_ERROR(ValidatePipelineOptions(options));
  if (caches.empty()) return absl::InvalidArgumentError("the pipeline needs at least one layer");
  for (size_t l = 0; l < caches.size(); ++l) {
    MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(caches[l]));
    const KvCacheView& a = caches[0];
    const KvCacheView& b = caches[l];
    if (a.dtype != b.dtype || a.num_blocks != b.num_blocks || a.block_size != b.block_size ||
        a.num_kv_heads != b.num_kv_heads || a.head_dim != b.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", l, "'s cache geometry differs from layer 0's"));
    }
  }
  if (num_heads < 1 || num_heads % caches[0].num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_heads must be a positive multiple of ",
                                                   "num_kv_heads ", caches[0].num_kv_heads,
                                                   ", got ", num_heads));
  }
  if (max_num_seqs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_num_seqs must be >= 1, got ", max_num_seqs));
  }
  if (!options.placement.dense) {
    MEMPIPE_RETURN_IF_ERROR(ValidateSparsityPolicy(options.policy, caches[0].block_size));
    if (selector == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "placement ", PlacementToString(options.placement), " needs a page selector, got none"));
    }
    CacheShape shape{caches[0].dtype, caches[0].num_blocks, caches[0].block_size,
                     caches[0].num_kv_heads, caches[0].head_dim};
    shape.digest_format = options.digest_format;
    const int num_layers = static_cast<int>(caches.size());
    for (int l = FirstSparseLayer(options.policy, num_layers); l < num_layers; ++l) {
      MEMPIPE_RETURN_IF_ERROR(selector->AddLayer(l, shape));
    }
  }
  // In flight at once: one request per micro-batch, so channels of that size never fill.
  const size_t capacity = options.queue_capacity > 0
                              ? static_cast<size_t>(options.queue_capacity)
                              : static_cast<size_t>(std::min(options.micro_batches, max_num_seqs));
  return std::unique_ptr<DecodePipeline>(new DecodePipeline(
      options, std::move(caches), num_heads, max_num_seqs, std::move(selector), capacity));
}

DecodePipeline::DecodePipeline(const PipelineOptions& options, std::vector<KvCacheView> caches,
                               int num_heads, int max_num_seqs,
                               std::unique_ptr<PageSelector> selector, size_t capacity)
    : options_(options),
      caches_(std::move(caches)),
      num_layers_(static_cast<int>(caches_.size())),
      num_heads_(num_heads),
      max_num_seqs_(max_num_seqs),
      // A reused selection grows by at most one page per step (one new token per sequence).
      max_selected_(options.policy.selection.PagesPerHead(caches_[0].block_size) + options.reuse -
                    1),
      scale_(options.scale > 0 ? options.scale
                               : 1.0f / std::sqrt(static_cast<float>(caches_[0].head_dim))),
      dense_(options.placement.dense),
      first_sparse_layer_(dense_ ? num_layers_ : FirstSparseLayer(options.policy, num_layers_)),
      transfers_(options.placement.NeedsTransfer()),
      link_(LinkBetween(options.placement.apply, options.placement.selector())),
      selector_(dense_ ? nullptr : std::move(selector)),
      to_selector_(capacity),
      to_apply_(capacity),
      to_front_(capacity) {
  if (!dense_) {
    const KvCacheView& c = caches_[0];
    const DigestView geometry{nullptr, c.dtype, c.num_blocks, c.num_kv_heads, c.head_dim};
    pages_.resize(num_layers_);
    counts_.resize(num_layers_);
    local_digests_.resize(num_layers_);
    for (int l = first_sparse_layer_; l < num_layers_; ++l) {
      pages_[l].assign(static_cast<size_t>(max_num_seqs_) * c.num_kv_heads * max_selected_, -1);
      counts_[l].assign(static_cast<size_t>(max_num_seqs_) * c.num_kv_heads, 0);
      local_digests_[l].assign(geometry.NumBytes(), 0);
    }
  }
  metrics_.placement = PlacementToString(options_.placement);
  metrics_.mode = std::string(PipelineModeName(options_.mode));
  metrics_.selector = dense_ ? "none" : std::string(selector_->Name());
  // Step 4 runs on options.apply_device when given, else on the host (a GPU apply asked for
  // without one runs here, and the label says so).
  metrics_.apply_device =
      options_.apply_device != nullptr ? std::string(options_.apply_device->Name())
      : options_.placement.apply == Device::kCpu
          ? "cpu"
          : "cpu (placement asked gpu; no GPU apply device given, this pipeline's decode runs on "
            "cpu)";
  metrics_.micro_batches = options_.micro_batches;
  metrics_.reuse = options_.reuse;
  metrics_.deadline_ms = options_.deadline_ms;
  metrics_.link = transfers_ ? link_.source : "none (selector on the apply device)";
  selector_thread_ = std::thread([this] { SelectorLoop(); });
  apply_thread_ = std::thread([this] { ApplyLoop(); });
}

DecodePipeline::~DecodePipeline() { Shutdown(); }

void DecodePipeline::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Each stage closes the channel it feeds once its input is closed and drained, so the close
  // travels down the pipeline behind any work still queued.
  // Results still in flight (a step that ended early) are discarded here: the front is their
  // only consumer, and leaving them would block the apply stage on a full channel and this
  // join with it.
  to_selector_.Close();
  while (to_front_.Pop()) {
  }
  selector_thread_.join();
  apply_thread_.join();
}

absl::Status DecodePipeline::Prefill(const BlockTableView& table) {
  if (shut_down_) return absl::FailedPreconditionError("the pipeline was shut down");
  if (options_.apply_device != nullptr) {
    for (int l = 0; l < num_layers_; ++l) {
      MEMPIPE_RETURN_IF_ERROR(options_.apply_device->AddLayer(l, caches_[l]));
    }
  }
  if (dense_) return absl::OkStatus();
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, caches_[0].block_size, caches_[0].num_blocks));
  for (int l = first_sparse_layer_; l < num_layers_; ++l) {
    const KvCacheView& c = caches_[l];
    const DigestView local{local_digests_[l].data(), c.dtype, c.num_blocks, c.num_kv_heads,
                           c.head_dim};
    MEMPIPE_RETURN_IF_ERROR(BuildDigests(c, table, local));
    if (!selector_dead_) {
      const absl::Status s = selector_->BuildDigests(l, c, table);
      if (!s.ok()) {
        // Its digests are incomplete: it can never select correctly again.
        selector_dead_ = true;
        metrics_.selector_dead = true;
        metrics_.selector_death_reason = absl::StrCat("BuildDigests failed: ", s.ToString());
      }
    }
  }
  // New digests: selections made before no longer hold.
  fresh_num_seqs_ = -1;
  return absl::OkStatus();
}

absl::Status DecodePipeline::ValidateStep(const StepInputs& in) const {
  const KvCacheView& c = caches_[0];
  if (in.table.num_seqs < 1 || in.table.num_seqs > max_num_seqs_) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs must be in [1, ", max_num_seqs_, "], got ", in.table.num_seqs));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(in.table, c.block_size, c.num_blocks));
  if (static_cast<int>(in.queries.size()) != num_layers_ ||
      static_cast<int>(in.outputs.size()) != num_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("queries and outputs need one entry per layer (",
                                                   num_layers_, "), got ", in.queries.size(),
                                                   " and ", in.outputs.size()));
  }
  if ((in.new_slots == nullptr) != in.new_keys.empty()) {
    return absl::InvalidArgumentError("new_slots and new_keys must be given together");
  }
  if (in.new_slots != nullptr && static_cast<int>(in.new_keys.size()) != num_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("new_keys needs one entry per layer (",
                                                   num_layers_, "), got ", in.new_keys.size()));
  }
  for (int l = 0; l < num_layers_; ++l) {
    if (in.outputs[l] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("outputs[", l, "] is null"));
    }
    if (in.new_slots != nullptr && in.new_keys[l] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("new_keys[", l, "] is null"));
    }
    MEMPIPE_RETURN_IF_ERROR(ValidateQuery(
        QueryView{in.queries[l], c.dtype, in.table.num_seqs, num_heads_, c.head_dim}, c, in.table));
  }
  if (in.new_slots != nullptr) {
    const int64_t num_slots = static_cast<int64_t>(c.num_blocks) * c.block_size;
    for (int s = 0; s < in.table.num_seqs; ++s) {
      if (in.new_slots[s] >= num_slots) {
        return absl::InvalidArgumentError(absl::StrCat("new_slots[", s, "] = ", in.new_slots[s],
                                                       " is past the cache (", num_slots,
                                                       " slots)"));
      }
    }
  }
  return absl::OkStatus();
}

BlockTableView DecodePipeline::TableRows(int b, int e) const {
  const BlockTableView& t = step_.table;
  return BlockTableView{t.block_table + static_cast<size_t>(b) * t.max_blocks_per_seq,
                        t.seq_lens + b, e - b, t.max_blocks_per_seq};
}

SelectionView DecodePipeline::SelectionRows(int layer, int b, int e) const {
  const int kv = caches_[0].num_kv_heads;
  // The buffers are owned by this object and only handed to one stage at a time (the channels
  // order the handoffs), hence the const_cast from a const accessor.
  auto& pages = const_cast<std::vector<int32_t>&>(pages_[layer]);
  auto& counts = const_cast<std::vector<int32_t>&>(counts_[layer]);
  return SelectionView{pages.data() + static_cast<size_t>(b) * kv * max_selected_,
                       counts.data() + static_cast<size_t>(b) * kv, e - b, kv, max_selected_};
}

QueryView DecodePipeline::QueryRows(int layer, int b, int e) const {
  const KvCacheView& c = caches_[0];
  const size_t row = static_cast<size_t>(num_heads_) * c.head_dim * DTypeSize(c.dtype);
  return QueryView{static_cast<const uint8_t*>(step_.queries[layer]) + b * row, c.dtype, e - b,
                   num_heads_, c.head_dim};
}

absl::Status DecodePipeline::Step(const StepInputs& inputs) {
  if (shut_down_) return absl::FailedPreconditionError("the pipeline was shut down");
  if (!broken_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the pipeline cannot run another step: ", broken_));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateStep(inputs));
  const Clock::time_point step_begin = Clock::now();
  step_ = inputs;
  const int num_seqs = inputs.table.num_seqs;
  const int block_size = caches_[0].block_size;

  // Partition into micro-batches as even as possible, at most one per sequence.
  const int m = std::min(options_.micro_batches, num_seqs);
  micro_batches_.assign(m, MicroBatch{});
  for (int i = 0; i < m; ++i) {
    micro_batches_[i] = MicroBatch{num_seqs * i / m, num_seqs * (i + 1) / m};
  }

  // A fresh selection every `reuse` steps, and whenever a reused one would not fit (a new batch,
  // or sequences that grew by more pages than the rows have room for).
  bool fresh = !dense_ && (steps_since_fresh_ % options_.reuse == 0 || fresh_num_seqs_ != num_seqs);
  if (!dense_ && !fresh) {
    for (int s = 0; s < num_seqs && !fresh; ++s) {
      fresh =
          NumPages(inputs.table.seq_lens[s], block_size) - fresh_num_pages_[s] > options_.reuse - 1;
    }
  }
  if (fresh) {
    steps_since_fresh_ = 0;
    fresh_num_seqs_ = num_seqs;
    fresh_num_pages_.resize(num_seqs);
    for (int s = 0; s < num_seqs; ++s) {
      fresh_num_pages_[s] = NumPages(inputs.table.seq_lens[s], block_size);
    }
  }
  ++steps_since_fresh_;

  const uint64_t step = step_index_++;
  auto make_job = [&](int layer, int mb) {
    Job j;
    j.step = step;
    j.layer = layer;
    j.micro_batch = mb;
    j.fresh = fresh && layer >= first_sparse_layer_;
    return j;
  };
  std::deque<Job> pending;
  std::vector<int> next_layer(m, 0);
  std::vector<BusyInterval> selector_busy, apply_busy;
  absl::Status first_error;
  const int total = m * num_layers_;
  int issued = 0, done = 0;
  try {
    for (int i = 0; i < m; ++i) pending.push_back(make_job(0, i));
    while (done < total) {
      // Issue what the selector channel takes; a full channel leaves the rest pending
      // (back-pressure) until a completion frees room. The front never blocks on a push, so
      // the ring of channels cannot deadlock.
      while (!pending.empty()) {
        Job& j = pending.front();
        j.issued = Clock::now();
        j.deadline =
            j.issued + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double, std::milli>(options_.deadline_ms));
        if (!to_selector_.TryPush(j)) break;
        pending.pop_front();
        ++issued;
      }
      if (issued == done) {
        // Nothing in flight and nothing accepted: the selector channel is closed.
        broken_ = "the selector stage's input channel is closed";
        return absl::InternalError(absl::StrCat("the pipeline stopped mid-step: ", broken_));
      }
      std::optional<Applied> a = to_front_.Pop();
      if (!a) {
        broken_ = "the apply stage stopped";
        return absl::InternalError(absl::StrCat("the pipeline stopped mid-step: ", broken_));
      }
      ++done;
      const Job& j = a->sel.job;
      if (j.step != step || j.micro_batch < 0 || j.micro_batch >= m ||
          next_layer[j.micro_batch] != j.layer) {
        // Cannot happen with FIFO channels; checked because the guarantee is the point.
        first_error.Update(absl::InternalError(
            absl::StrCat("request (step ", j.step, ", micro-batch ", j.micro_batch, ", layer ",
                         j.layer, ") arrived out of order")));
        continue;
      }
      ++next_layer[j.micro_batch];
      if (j.layer + 1 < num_layers_) pending.push_back(make_job(j.layer + 1, j.micro_batch));
      RecordApplied(*a, selector_busy, apply_busy, first_error);
    }
  } catch (const std::exception& e) {
    first_error = absl::InternalError(absl::StrCat("decode step ", step, " failed: ", e.what()));
  } catch (...) {
    first_error =
        absl::InternalError(absl::StrCat("decode step ", step, " failed: unknown exception"));
  }
  // Whatever stopped the loop early, no request of this step may outlive it: the stage threads
  // read the caller's buffers. Later layers that were never issued simply do not run.
  while (done < issued) {
    if (!to_front_.Pop()) {
      broken_ = "the apply stage stopped";
      break;
    }
    ++done;
  }
  metrics_.overlap_ms += BusyOverlapMs(selector_busy, apply_busy);
  const double step_ms = Ms(Clock::now() - step_begin);
  metrics_.wall_ms += step_ms;
  metrics_.step.Record(step_ms);
  ++metrics_.steps;
  return first_error;
}

void DecodePipeline::RecordApplied(const Applied& a, std::vector<BusyInterval>& selector_busy,
                                   std::vector<BusyInterval>& apply_busy,
                                   absl::Status& first_error) {
  const Selected& s = a.sel;
  const Job& j = s.job;
  // Metrics.
  PipelineMetrics& mt = metrics_;
  ++mt.requests;
  if (j.fresh) ++mt.selections_fresh;
  if (s.source == SelectionSource::kReused) ++mt.selections_reused;
  if (s.source == SelectionSource::kSelector) ++mt.selections_by_selector;
  if (s.source == SelectionSource::kFallback) {
    ++mt.fallbacks;
    switch (s.fallback) {
      case FallbackReason::kTimeout:
        ++mt.fallbacks_timeout;
        break;
      case FallbackReason::kError:
        ++mt.fallbacks_error;
        break;
      case FallbackReason::kDead:
        ++mt.fallbacks_dead;
        break;
      case FallbackReason::kExpired:
        ++mt.fallbacks_expired;
        break;
      case FallbackReason::kInvalid:
        ++mt.fallbacks_invalid;
        break;
      case FallbackReason::kNone:
        break;
    }
  }
  if (!s.death.empty() && !mt.selector_dead) {
    mt.selector_dead = true;
    mt.selector_death_reason = s.death;
  }
  mt.selector_queue.Record(Ms(s.picked - j.issued));
  if (s.prepare_ms >= 0) mt.prepare.Record(s.prepare_ms);
  if (s.select_ms >= 0) mt.select.Record(s.select_ms);
  if (a.fallback_ms >= 0) mt.fallback.Record(a.fallback_ms);
  mt.apply.Record(Ms(a.end - a.begin));
  mt.request.Record(Ms(a.end - j.issued));
  mt.bytes_to_selector += s.bytes_to;
  mt.bytes_from_selector += s.bytes_from;
  mt.transfer_ms_reported += s.transfer_reported_ms;
  mt.modeled_transfer_ms += s.transfer_modeled_ms;
  mt.selector_relevancy_ms += s.relevancy_ms;
  mt.selector_retrieval_ms += s.retrieval_ms;
  mt.modeled_device_ms += s.modeled_device_ms;
  mt.modeled_energy_mj += s.modeled_energy_mj;
  mt.modeled_calls += s.modeled_calls;
  if (s.busy_end > s.picked) {
    selector_busy.emplace_back(s.picked, s.busy_end);
    mt.selector_busy_ms += Ms(s.busy_end - s.picked);
  }
  apply_busy.emplace_back(a.begin, a.end);
  mt.apply_busy_ms += Ms(a.end - a.begin);
  if (!a.status.ok()) first_error.Update(a.status);
  if (observer_) {
    const MicroBatch& mb = micro_batches_[j.micro_batch];
    // The observer is the caller's code: whatever it throws becomes this step's error, and
    // the step goes on completing its requests.
    try {
      observer_(RequestRecord{j.step, j.micro_batch, j.layer, mb.begin, mb.end, s.source,
                              s.fallback, a.status});
    } catch (const std::exception& e) {
      first_error.Update(absl::InternalError(absl::StrCat("the request observer threw on (step ",
                                                          j.step, ", micro-batch ", j.micro_batch,
                                                          ", layer ", j.layer, "): ", e.what())));
    } catch (...) {
      first_error.Update(absl::InternalError(
          absl::StrCat("the request observer threw on (step ", j.step, ", micro-batch ",
                       j.micro_batch, ", layer ", j.layer, "): unknown exception")));
    }
  }
}

void DecodePipeline::SelectorLoop() {
  std::optional<InFlight> current;
  for (;;) {
    if (!current) {
      std::optional<Job> job = to_selector_.Pop();
      if (!job) break;  // closed and drained
      current = StartSelectionNoThrow(*job);
    }
    Selected done = FinishSelectionNoThrow(*current);
    current.reset();
    // Start the next queued request before handing this result to the decoder: waking the
    // apply thread may take this core, and the device should already be working meanwhile.
    // Only one ticket is outstanding at a time (this one's Wait has returned).
    if (std::optional<Job> job = to_selector_.TryPop()) current = StartSelectionNoThrow(*job);
    // Blocks while the apply channel is full: back-pressure up the pipeline.
    if (!to_apply_.Push(done)) break;
  }
  to_apply_.Close();
}

DecodePipeline::InFlight DecodePipeline::StartSelectionNoThrow(const Job& job) {
  std::string what;
  try {
    return StartSelection(job);
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
    what = "unknown exception";
  }
  InFlight f;
  Selected& s = f.sel;
  s.job = job;
  s.picked = s.busy_end = Clock::now();
  if (job.layer < first_sparse_layer_) {
    s.source = SelectionSource::kDense;
    return f;
  }
  NoteSelectorFailure(s, absl::InternalError(absl::StrCat("the selector threw: ", what)),
                      /*fatal=*/true);
  if (!job.fresh) {
    s.source = SelectionSource::kReused;
  } else {
    s.source = SelectionSource::kFallback;
    s.fallback = FallbackReason::kError;
  }
  return f;
}

DecodePipeline::Selected DecodePipeline::FinishSelectionNoThrow(InFlight& f) {
  std::string what;
  try {
    return FinishSelection(f);
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
    what = "unknown exception";
  }
  Selected s = f.sel;
  s.source = SelectionSource::kFallback;
  s.fallback = FallbackReason::kError;
  NoteSelectorFailure(s, absl::InternalError(absl::StrCat("the selector threw: ", what)),
                      /*fatal=*/true);
  s.busy_end = Clock::now();
  return s;
}

void DecodePipeline::NoteSelectorFailure(Selected& s, const absl::Status& status, bool fatal) {
  if (selector_dead_) return;
  ++consecutive_failures_;
  if (fatal || consecutive_failures_ >= options_.dead_after_failures) {
    selector_dead_ = true;
    s.death = fatal ? absl::StrCat("digest update failed: ", status.ToString())
                    : absl::StrCat(consecutive_failures_,
                                   " consecutive failures, the last: ", status.ToString());
  }
}

DecodePipeline::InFlight DecodePipeline::StartSelection(const Job& job) {
  InFlight f;
  Selected& s = f.sel;
  s.job = job;
  s.picked = Clock::now();
  if (job.layer < first_sparse_layer_) {
    s.source = SelectionSource::kDense;
    return f;
  }
  const Job& j = s.job;
  const MicroBatch mb = micro_batches_[j.micro_batch];
  const KvCacheView& c = caches_[0];
  const int n = mb.end - mb.begin;
  const size_t elem = DTypeSize(c.dtype);

  // Step 1 on the selector device: this step's keys, every step (reused or not), so its digests
  // stay current. A failed update leaves them stale for good: the selector is dead.
  if (step_.new_slots != nullptr && !selector_dead_) {
    const size_t key_row = static_cast<size_t>(c.num_kv_heads) * c.head_dim * elem;
    const auto t0 = Clock::now();
    const absl::Status st = selector_->AppendKeys(
        j.layer, step_.new_slots + mb.begin, n,
        static_cast<const uint8_t*>(step_.new_keys[j.layer]) + mb.begin * key_row);
    s.prepare_ms = Ms(Clock::now() - t0);
    const SelectorCosts costs = selector_->Costs();
    if (costs.modeled_device_ms) {
      s.modeled_device_ms += *costs.modeled_device_ms;
      ++s.modeled_calls;
    }
    if (costs.modeled_energy_mj) s.modeled_energy_mj += *costs.modeled_energy_mj;
    if (transfers_) {
      const uint64_t bytes = n * key_row + n * sizeof(int64_t);
      s.bytes_to += bytes;
      if (costs.transfer_ms > 0) {
        s.transfer_reported_ms += costs.transfer_ms;
      } else {
        s.transfer_modeled_ms += link_.ModeledMs(static_cast<double>(bytes));
      }
    }
    if (!st.ok()) NoteSelectorFailure(s, st, /*fatal=*/true);
  }

  if (!j.fresh) {
    s.source = SelectionSource::kReused;
    return f;
  }
  s.source = SelectionSource::kFallback;
  if (selector_dead_) {
    s.fallback = FallbackReason::kDead;
    return f;
  }
  if (Clock::now() >= j.deadline) {
    s.fallback = FallbackReason::kExpired;
    return f;
  }
  // Steps 2+3 on the selector device, bounded by the request's deadline.
  const SelectRequest request{j.layer, QueryRows(j.layer, mb.begin, mb.end),
                              TableRows(mb.begin, mb.end), options_.policy.selection,
                              SelectionRows(j.layer, mb.begin, mb.end)};
  f.submit_begin = Clock::now();
  absl::StatusOr<SelectTicket> ticket = selector_->Submit(request);
  f.submitted = ticket.ok();
  if (ticket.ok()) {
    f.ticket = *ticket;
  } else {
    f.submit_error = ticket.status();
  }
  return f;
}

DecodePipeline::Selected DecodePipeline::FinishSelection(InFlight& f) {
  Selected& s = f.sel;
  const Job& j = s.job;
  if (!f.submitted && f.submit_error.ok()) {  // nothing was asked of the device
    s.busy_end = Clock::now();
    return s;
  }
  absl::Status st = f.submit_error;
  if (f.submitted) {
    const absl::Time deadline = absl::Now() + absl::FromChrono(j.deadline - Clock::now());
    st = selector_->Wait(f.ticket, deadline);
  }
  s.select_ms = Ms(Clock::now() - f.submit_begin);
  const MicroBatch mb = micro_batches_[j.micro_batch];
  const KvCacheView& c = caches_[0];
  const int n = mb.end - mb.begin;
  const size_t elem = DTypeSize(c.dtype);
  // What was sent is accounted once submitted; what comes back, and the device's own cost
  // report, only for a completed request (Costs() describes the last completed one).
  const SelectorCosts costs = st.ok() ? selector_->Costs() : SelectorCosts{};
  if (costs.modeled_device_ms) {
    s.modeled_device_ms += *costs.modeled_device_ms;
    ++s.modeled_calls;
  }
  if (costs.modeled_energy_mj) s.modeled_energy_mj += *costs.modeled_energy_mj;
  s.relevancy_ms = costs.relevancy_ms;
  s.retrieval_ms = costs.retrieval_ms;
  if (transfers_ && f.submitted) {
    const uint64_t to = n * (static_cast<size_t>(num_heads_) * c.head_dim * elem +
                             static_cast<size_t>(step_.table.max_blocks_per_seq + 1) * 4);
    const uint64_t from = st.ok() ? n * static_cast<size_t>(c.num_kv_heads) *
                                        (static_cast<size_t>(max_selected_) + 1) * 4
                                  : 0;
    s.bytes_to += to;
    s.bytes_from += from;
    if (costs.transfer_ms > 0) {
      s.transfer_reported_ms += costs.transfer_ms;
    } else {
      s.transfer_modeled_ms +=
          link_.ModeledMs(static_cast<double>(to)) + link_.ModeledMs(static_cast<double>(from));
    }
  }
  // A selection from another device is checked before anything trusts it: a device that
  // says OK and leaves garbage is a failed selection like any other.
  absl::Status valid = absl::OkStatus();
  if (st.ok()) {
    valid = ValidateSelection(SelectionRows(j.layer, mb.begin, mb.end), TableRows(mb.begin, mb.end),
                              c.block_size, options_.policy.selection);
  }
  if (st.ok() && valid.ok()) {
    consecutive_failures_ = 0;
    s.source = SelectionSource::kSelector;
  } else if (st.ok()) {
    s.fallback = FallbackReason::kInvalid;
    NoteSelectorFailure(s, valid, /*fatal=*/false);
  } else {
    s.fallback = absl::IsDeadlineExceeded(st) ? FallbackReason::kTimeout : FallbackReason::kError;
    NoteSelectorFailure(s, st, /*fatal=*/false);
  }
  s.busy_end = Clock::now();
  return s;
}

void DecodePipeline::ApplyLoop() {
  while (std::optional<Selected> sel = to_apply_.Pop()) {
    Applied a;
    a.sel = std::move(*sel);
    a.begin = Clock::now();
    try {
      a.status = RunApply(a);
    } catch (const std::exception& e) {
      a.status = absl::InternalError(absl::StrCat("decode of (step ", a.sel.job.step, ", layer ",
                                                  a.sel.job.layer, ") threw: ", e.what()));
    } catch (...) {
      a.status = absl::InternalError(
          absl::StrCat("decode of (step ", a.sel.job.step, ", layer ", a.sel.job.layer, ") threw"));
    }
    a.end = Clock::now();
    if (!to_front_.Push(a)) break;
  }
  to_front_.Close();
}

absl::Status DecodePipeline::RunApply(Applied& a) {
  const Selected& s = a.sel;
  const Job& j = s.job;
  const MicroBatch mb = micro_batches_[j.micro_batch];
  const KvCacheView& c = caches_[j.layer];
  const BlockTableView table = TableRows(mb.begin, mb.end);
  const int n = mb.end - mb.begin;
  const size_t elem = DTypeSize(c.dtype);
  const size_t io_row = static_cast<size_t>(num_heads_) * c.head_dim * elem;
  const DecodeIo io{static_cast<const uint8_t*>(step_.queries[j.layer]) + mb.begin * io_row,
                    static_cast<uint8_t*>(step_.outputs[j.layer]) + mb.begin * io_row,
                    c.dtype,
                    n,
                    num_heads_,
                    c.head_dim,
                    options_.apply_threads};
  ApplyDevice* device = options_.apply_device.get();
  if (device != nullptr && step_.new_slots != nullptr) {
    MEMPIPE_RETURN_IF_ERROR(device->SyncTokens(j.layer, step_.new_slots + mb.begin, n));
  }
  if (s.source == SelectionSource::kDense) {
    return device != nullptr ? device->Decode(j.layer, io, table, nullptr, scale_)
                             : DenseDecode(io, c, table, scale_);
  }

  // The apply device's own digests track every step, so a fallback is always possible.
  const DigestView local{local_digests_[j.layer].data(), c.dtype, c.num_blocks, c.num_kv_heads,
                         c.head_dim};
  if (step_.new_slots != nullptr) {
    const size_t key_row = static_cast<size_t>(c.num_kv_heads) * c.head_dim * elem;
    MEMPIPE_RETURN_IF_ERROR(UpdateDigestsFromKeys(
        local, c.block_size, step_.new_slots + mb.begin, n,
        static_cast<const uint8_t*>(step_.new_keys[j.layer]) + mb.begin * key_row));
  }
  const SelectionView sel = SelectionRows(j.layer, mb.begin, mb.end);
  if (s.source == SelectionSource::kFallback) {
    const auto t0 = Clock::now();
    MEMPIPE_RETURN_IF_ERROR(ScoreAndSelect(QueryRows(j.layer, mb.begin, mb.end), c, local, table,
                                           options_.policy.selection, sel, options_.apply_threads));
    a.fallback_ms = Ms(Clock::now() - t0);
  } else if (s.source == SelectionSource::kReused) {
    MEMPIPE_RETURN_IF_ERROR(ExtendToLastPage(sel, table, c.block_size));
  }
  const PageList page_list{sel.pages, sel.counts, sel.num_kv_heads, sel.max_selected};
  return device != nullptr ? device->Decode(j.layer, io, table, &page_list, scale_)
                           : SparseDecode(io, c, table, page_list, scale_);
}

absl::StatusOr<SelectionView> DecodePipeline::LastSelection(int layer) const {
  if (layer < 0 || layer >= num_layers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer must be in [0, ", num_layers_, "), got ", layer));
  }
  if (layer < first_sparse_layer_) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " decodes densely (placement ", metrics_.placement,
                     ", dense_layers ", options_.policy.dense_layers, "): it selects no pages"));
  }
  if (step_index_ == 0) return absl::FailedPreconditionError("no step has run yet");
  return SelectionRows(layer, 0, step_.table.num_seqs);
}

PipelineMetrics DecodePipeline::Metrics() const {
  PipelineMetrics m = metrics_;
  m.to_selector = to_selector_.Stats();
  m.to_apply = to_apply_.Stats();
  m.to_front = to_front_.Stats();
  return m;
}

void DecodePipeline::ResetMetrics() {
  PipelineMetrics fresh;
  fresh.placement = metrics_.placement;
  fresh.mode = metrics_.mode;
  fresh.selector = metrics_.selector;
  fresh.apply_device = metrics_.apply_device;
  fresh.micro_batches = metrics_.micro_batches;
  fresh.reuse = metrics_.reuse;
  fresh.deadline_ms = metrics_.deadline_ms;
  fresh.link = metrics_.link;
  fresh.selector_dead = metrics_.selector_dead;
  fresh.selector_death_reason = metrics_.selector_death_reason;
  metrics_ = std::move(fresh);
  to_selector_.ResetStats();
  to_apply_.ResetStats();
  to_front_.ResetStats();
}

}  // namespace mempipe
