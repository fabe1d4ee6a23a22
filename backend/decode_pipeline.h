// mempipe backend: the decode pipeline. Page selection (steps 1-3) on the placement's selector
// device and decode attention (step 4) on the apply device, each on its own thread, connected
// by bounded lock-free SPSC channels (backend/spsc_channel.h).
//
//        Step() (caller thread: the "front")
//          |  Job (layer, micro-batch, fresh?, deadline)          SpscChannel to_selector
//          v
//    selector thread: AppendKeys (prepare) -> Submit/Wait (relevancy + retrieval) until the
//          |          deadline; a late, failed or dead selector marks the request for fallback.
//          |          Before handing a result on, it starts the next queued request, so the
//          |          device never idles while this thread hands off (or is preempted).
//          v  Selected                                            SpscChannel to_apply
//    apply thread: local digest update -> fallback ScoreAndSelect if needed -> reuse extension
//          |       -> SparseDecode (DenseDecode for placement dense and the dense layers)
//          v  Applied                                             SpscChannel to_front
//        Step(): records metrics, issues (micro-batch, layer + 1), returns when all are applied
//
// Dependencies are the model's: layer L + 1 of a micro-batch is issued only once layer L of it
// has been applied (its query would come from layer L's output). In `sync` mode there is one
// micro-batch, so the selector and the decoder take turns; in `pipelined` mode the batch is split
// into micro-batches and the selector works on one while the decoder works on another. With
// `reuse = C` a (layer, micro-batch)'s selection is computed every C steps; the steps between
// reuse it, extended by the pages the sequences grew into since (so the local window always
// holds the newest token). Digests are updated every step on the selector device and, for
// fallback, on the apply device.
//
// Guarantees: every (step, micro-batch, layer) request is applied exactly once and, per
// micro-batch, in layer order; a selection that misses its deadline, fails, or comes from a dead
// selector is replaced by local selection on the apply device (ScoreAndSelect over the apply
// side's own digests), and since every device's selection is bit-exact with the CPU reference
// (retriever/relevancy.h), the outputs do not depend on timing or faults. The selector must
// honour its Wait() deadline (retriever/page_selector.h); the pipeline relies on it to make
// progress.
//
// Back-pressure: at most one request per micro-batch is in flight, so channels of that capacity
// never fill; a smaller `queue_capacity` makes them fill. The front only ever TryPush()es (a
// request that does not fit waits in the front until a completion frees room) while the stage
// threads block on full channels, so the ring front -> selector -> apply -> front cannot
// deadlock.
//
// Threading: Create, Prefill, Step, Metrics, ResetMetrics and Shutdown are called from one
// thread at a time (the front). The destructor shuts down: it drains the channels and joins both
// stage threads.
//
//   PipelineOptions o;
//   o.placement = *ParsePlacement("cpu");
//   o.mode = PipelineMode::kPipelined;
//   o.micro_batches = 4;
//   MEMPIPE_ASSIGN_OR_RETURN(auto selector, MakePageSelector(o.placement.selector()));
//   MEMPIPE_ASSIGN_OR_RETURN(auto pipe, DecodePipeline::Create(o, caches, num_heads,
//                                                              max_seqs, std::move(selector)));
//   MEMPIPE_RETURN_IF_ERROR(pipe->Prefill(table));
//   for (...) MEMPIPE_RETURN_IF_ERROR(pipe->Step(inputs));
//   std::cout << pipe->Metrics().ToText();
#ifndef MEMPIPE_BACKEND_DECODE_PIPELINE_H_
#define MEMPIPE_BACKEND_DECODE_PIPELINE_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "backend/apply_device.h"
#include "backend/pipeline_metrics.h"
#include "backend/placement.h"
#include "backend/policy.h"
#include "backend/spsc_channel.h"
#include "core/clock.h"
#include "core/paged_kv.h"
#include "retriever/page_selector.h"
#include "retriever/select.h"

namespace mempipe {

enum class PipelineMode : int { kSync = 0, kPipelined = 1 };
absl::string_view PipelineModeName(PipelineMode mode);
// "sync" | "pipelined"; the error names the bad value.
absl::StatusOr<PipelineMode> ParsePipelineMode(absl::string_view name);

struct PipelineOptions {
  Placement placement;
  PipelineMode mode = PipelineMode::kSync;
  int micro_batches = 1;        // sync: 1; pipelined: >= 1 (at most one per sequence is used)
  int reuse = 1;                // a selection serves this many steps, >= 1
  double deadline_ms = 100;     // per selection, from its issue, > 0
  int queue_capacity = 0;       // 0: large enough never to fill; >= 1 applies back-pressure
  int dead_after_failures = 3;  // consecutive selector failures that declare it dead, >= 1
  // Which layers select pages (backend/policy.h); the first policy.dense_layers layers
  // decode densely and select nothing (Quest keeps 2).
  SparsityPolicy policy{.dense_layers = 0, .selection = {}};
  // How the selector stores and scans the digests (retriever/digest.h): native or int8. The
  // pipeline's own fallback selection keeps native host digests.
  DigestFormat digest_format = DigestFormat::kNative;
  int apply_threads = 1;  // host threads of the CPU decode (DecodeIo::num_threads)
  float scale = 0;        // softmax scale; 0 means 1 / sqrt(head_dim)
  // Step 4's device (backend/apply_device.h): null decodes on the host (DenseDecode /
  // SparseDecode); given, Prefill uploads every layer's cache to it and each request syncs the
  // micro-batch's new tokens and decodes there (dense and sparse; fallback selection stays on
  // the host's digests). Used only by the apply thread once the pipeline is created.
  std::shared_ptr<ApplyDevice> apply_device;
};

// Validates the options alone (placement included). InvalidArgument naming the bad value.
[[nodiscard]] absl::Status ValidatePipelineOptions(const PipelineOptions& options);

// Where a request's pages came from.
enum class SelectionSource : int { kSelector = 0, kFallback = 1, kReused = 2, kDense = 3 };
// kInvalid: the selector reported success but its selection is malformed (a count out of
// range, pages not ascending or outside the sequence, sinks or locals missing), as a device
// that returns garbage does; the pipeline checks every selection it did not compute itself.
enum class FallbackReason : int {
  kNone = 0,
  kTimeout = 1,
  kError = 2,
  kDead = 3,
  kExpired = 4,
  kInvalid = 5
};
absl::string_view SelectionSourceName(SelectionSource source);
absl::string_view FallbackReasonName(FallbackReason reason);

// One applied request, as reported to the RequestObserver.
struct RequestRecord {
  uint64_t step = 0;
  int micro_batch = 0;
  int layer = 0;
  int seq_begin = 0;  // the micro-batch's sequences: [seq_begin, seq_end)
  int seq_end = 0;
  SelectionSource source = SelectionSource::kSelector;
  FallbackReason fallback = FallbackReason::kNone;
  absl::Status status;
};
// Called on the front thread for every applied request, in completion order.
using RequestObserver = std::function<void(const RequestRecord&)>;

// One decode step for the whole batch. The caller has already written this step's new keys
// and values into every layer's cache (WriteKv); seq_lens count them.
struct StepInputs {
  BlockTableView table;                // [num_seqs, max_blocks_per_seq], seq_lens [num_seqs]
  const int64_t* new_slots = nullptr;  // [num_seqs] slot of each sequence's new token, < 0 for
                                       // none; nullptr: no new token this step
  std::vector<const void*> new_keys;   // [num_layers] -> [num_seqs, num_kv_heads, head_dim]
                                       // (cache dtype); empty iff new_slots is nullptr
  std::vector<const void*> queries;    // [num_layers] -> [num_seqs, num_heads, head_dim]
  std::vector<void*> outputs;          // [num_layers] -> [num_seqs, num_heads, head_dim]
};

class DecodePipeline {
 public:
  // `caches`: one per layer, host memory, same geometry, outliving the pipeline. `selector`:
  // the selector device's PageSelector (ignored, may be null, for placement dense); the pipeline
  // registers every layer with it. `max_num_seqs` bounds the batch of every Step.
  // Errors: invalid options, caches of different geometry, a selector that refuses a layer.
  static absl::StatusOr<std::unique_ptr<DecodePipeline>> Create(
      const PipelineOptions& options, std::vector<KvCacheView> caches, int num_heads,
      int max_num_seqs, std::unique_ptr<PageSelector> selector);

  ~DecodePipeline();
  DecodePipeline(const DecodePipeline&) = delete;
  DecodePipeline& operator=(const DecodePipeline&) = delete;

  // After prefill wrote the caches: builds every layer's digests on the selector device and on
  // the apply device, and uploads the caches to options.apply_device if one is given. A selector
  // that fails here is declared dead (selection falls back). Errors: a bad table.
  [[nodiscard]] absl::Status Prefill(const BlockTableView& table);

  // One decode step over all layers and micro-batches; returns when every request is applied.
  // Errors: bad inputs (before anything runs), or the first apply error (every request still
  // completes). Never throws: an exception from the observer becomes this step's error (the
  // step still completes every request); an exception from the selector is a selector failure
  // (fallback; the selector is declared dead) and one from the decode that request's error. If
  // the step cannot finish its requests it drains those in flight before returning, so none
  // outlives the call; a pipeline whose stages stopped refuses every later Step
  // (FailedPrecondition naming why).
  [[nodiscard]] absl::Status Step(const StepInputs& inputs);

  // Stops the stage threads after draining the channels (results still in flight are
  // discarded, so it cannot block on a full channel). Idempotent; Step fails afterwards.
  void Shutdown();

  void SetObserver(RequestObserver observer) { observer_ = std::move(observer); }

  // The selection last used for `layer`: [num_seqs, num_kv_heads, max_selected] pages and
  // [num_seqs, num_kv_heads] counts of the last Step's batch. Not for placement dense nor for
  // the dense layers.
  absl::StatusOr<SelectionView> LastSelection(int layer) const;

  // Rows of a selection: budget pages plus room for the pages a reused selection grows into.
  int max_selected() const { return max_selected_; }

  PipelineMetrics Metrics() const;
  void ResetMetrics();

 private:
  struct Job {  // front -> selector
    uint64_t step = 0;
    int layer = 0;
    int micro_batch = 0;
    bool fresh = false;  // needs a new selection (else reuse or dense)
    Clock::time_point issued;
    Clock::time_point deadline;
  };
  struct Selected {  // selector -> apply
    Job job;
    SelectionSource source = SelectionSource::kSelector;
    FallbackReason fallback = FallbackReason::kNone;
    Clock::time_point picked, busy_end;  // selector thread busy over [picked, busy_end)
    double prepare_ms = -1;              // < 0: not run
    double select_ms = -1;
    double relevancy_ms = 0, retrieval_ms = 0;  // as the selector's Costs() reports them
    uint64_t bytes_to = 0, bytes_from = 0;
    double transfer_reported_ms = 0, transfer_modeled_ms = 0;
    double modeled_device_ms = 0, modeled_energy_mj = 0;
    int modeled_calls = 0;
    std::string death;  // set on the request that declared the selector dead
  };
  struct Applied {  // apply -> front
    Selected sel;
    absl::Status status;
    Clock::time_point begin, end;  // apply thread busy
    double fallback_ms = -1;
  };
  struct MicroBatch {
    int begin = 0, end = 0;
  };

  DecodePipeline(const PipelineOptions& options, std::vector<KvCacheView> caches, int num_heads,
                 int max_num_seqs, std::unique_ptr<PageSelector> selector, size_t capacity);

  absl::Status ValidateStep(const StepInputs& inputs) const;
  // A selection on its way through the selector device.
  struct InFlight {
    Selected sel;
    bool submitted = false;  // a ticket is outstanding
    SelectTicket ticket = 0;
    absl::Status submit_error;
    Clock::time_point submit_begin;
  };

  void SelectorLoop();
  void ApplyLoop();
  InFlight StartSelection(const Job& job);  // prepare, then Submit unless no selection is due
  Selected FinishSelection(InFlight& f);    // Wait (bounded by the deadline) and classify
  // The two above, with an exception from the selector turned into a failed selection (the
  // selector's state is unknown afterwards: it is declared dead).
  InFlight StartSelectionNoThrow(const Job& job);
  Selected FinishSelectionNoThrow(InFlight& f);
  // Metrics and the observer for one applied request (an observer exception becomes an
  // error in `first_error`).
  void RecordApplied(const Applied& a, std::vector<BusyInterval>& selector_busy,
                     std::vector<BusyInterval>& apply_busy, absl::Status& first_error);
  absl::Status RunApply(Applied& a);
  void NoteSelectorFailure(Selected& s, const absl::Status& status, bool fatal);

  // Views of micro-batch rows [b, e) of this step's inputs.
  BlockTableView TableRows(int b, int e) const;
  SelectionView SelectionRows(int layer, int b, int e) const;
  QueryView QueryRows(int layer, int b, int e) const;

  const PipelineOptions options_;
  const std::vector<KvCacheView> caches_;
  const int num_layers_;
  const int num_heads_;
  const int max_num_seqs_;
  const int max_selected_;
  const float scale_;
  const bool dense_;
  const int first_sparse_layer_;  // layers below it decode densely
  const bool transfers_;
  const LinkModel link_;
  std::unique_ptr<PageSelector> selector_;  // used by the selector thread (and Prefill)

  // Per layer, owned storage: the selection [max_num_seqs, kv_heads, max_selected] and counts,
  // and the apply device's own digests (for fallback); empty for dense layers.
  std::vector<std::vector<int32_t>> pages_;
  std::vector<std::vector<int32_t>> counts_;
  std::vector<std::vector<uint8_t>> local_digests_;

  // This step's inputs and partition: written by the front before it issues the step's first
  // job, read by the stage threads (ordered by the channels' release/acquire).
  StepInputs step_;
  std::vector<MicroBatch> micro_batches_;

  // Selector thread state (also written by Prefill, between steps).
  int consecutive_failures_ = 0;
  bool selector_dead_ = false;

  // Front state.
  uint64_t step_index_ = 0;
  uint64_t steps_since_fresh_ = 0;
  int fresh_num_seqs_ = -1;
  std::vector<int> fresh_num_pages_;  // [num_seqs] pages per sequence at the last fresh step
  bool shut_down_ = false;
  std::string broken_;  // non-empty: the stages stopped (why); Step refuses
  RequestObserver observer_;
  PipelineMetrics metrics_;

  SpscChannel<Job> to_selector_;
  SpscChannel<Selected> to_apply_;
  SpscChannel<Applied> to_front_;
  std::thread selector_thread_;
  std::thread apply_thread_;
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_DECODE_PIPELINE_H_
