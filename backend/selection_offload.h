// mempipe backend: the selection-offload engine -- steps 1-3 on a selector device (the emulated or
// XRT U55C) fed from the decode thread without a host-side blocking call.
//
//   decode thread / GPU stream          SPSC channel (Boost.Lockfree)       selector thread
//   Append(layer, slots, keys) ------->  Job{append, layer, buffer}  ---->   AppendKeys
//   Submit(slot, layer, q, table) ---->  Job{select, slot, seq}      ---->   Submit + Wait
//   (deadline)
//                                                                            ValidateSelection
//   Wait(slot) <- slot flag (seq, code) <---------------- publish: data, then release store of seq
//
// A fixed ring of `slots`; each has staging for its inputs (query, block table rows, lengths)
// and its output (pages, counts) plus a control block of 32-bit words in host memory that the
// consumer polls: on the GPU (backend/gpu/gpu_selection_offload.h) that memory is pinned and
// mapped, a tiny kernel copies the inputs in and another polls the flag; in CPU mode (this
// class's own Submit/Wait) the calling thread copies and waits. Per slot:
//   issued    sequence number of the newest request (written by whoever issues it);
//   published sequence number of the newest result (selector thread, release store after the
//             data and `code`); a consumer takes a result only when published == issued, so a
//             late result of an earlier request can never be mistaken for the current one;
//   released  sequence number whose inputs the selector no longer reads: the next request's
//             inputs may be written only when released == issued (the "gate").
// Key appends have a ring of `append_ring` staging entries per layer (request seq writes entry
// (seq - 1) % append_ring), so an append waits only when that many of its layer's earlier
// appends are still queued for the card; then it waits for the oldest (stream-ordered on the
// GPU, at most append_timeout_ms): a lagging card delays the producer, it is not declared dead
// for being slow. A layer's appends must be issued from one stream (CPU mode: any thread; they
// are serialized). The selector takes every job in issue order, so appends reach the card in
// order, each exactly once.
// Every failure inside the selector thread becomes a reason code (OffloadReason), never an
// exception or std::terminate; `dead_after_failures` consecutive failures declare the selector
// dead, and every later request fails fast with kDead. A timeout of a request that queued
// behind earlier work (the selector thread was busy when it was issued) and started with less
// than half its deadline left -- it expired in the queue, or nearly -- is a fallback (kTimeout)
// but not a failure: the card is late, not broken (OffloadMetrics::late_timeouts). Results are
// published in request order; Shutdown() drains the channel (every queued request is published) and
// joins the thread.
//
//   MEMPIPE_ASSIGN_OR_RETURN(auto selector, MakeFpgaSelector(fpga_options));
//   MEMPIPE_ASSIGN_OR_RETURN(auto off, SelectionOffload::Create(std::move(selector), {}));
//   MEMPIPE_RETURN_IF_ERROR(off->AddLayer(0, shape));
//   MEMPIPE_RETURN_IF_ERROR(off->BuildDigests(0, cache, table));
//   MEMPIPE_RETURN_IF_ERROR(off->Append(0, slots, n, keys));        // per step, new keys
//   MEMPIPE_RETURN_IF_ERROR(off->Submit(/*slot=*/0, 0, query, table, config));
//   MEMPIPE_ASSIGN_OR_RETURN(OffloadReason r, off->Wait(0, selection));  // kSelected or fallback
#ifndef MEMPIPE_BACKEND_SELECTION_OFFLOAD_H_
#define MEMPIPE_BACKEND_SELECTION_OFFLOAD_H_

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "backend/offload_control.h"
#include "backend/spsc_channel.h"
#include "core/clock.h"
#include "core/paged_kv.h"
#include "retriever/page_selector.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {

struct SelectionOffloadOptions {
  int slots = 64;               // requests in flight at most (one per slot), >= 1
  double deadline_ms = 100;     // per request, from its issue, > 0
  int dead_after_failures = 3;  // consecutive failures that declare the selector dead, >= 1
  int max_layers = 256;         // distinct layers AddLayer accepts
  size_t channel_capacity = 0;  // 0: 4 * slots + 4 * max_layers
  // How long a select issuer waits for its slot's previous request to release its inputs
  // before giving up (kBusy); 0: deadline_ms.
  double gate_timeout_ms = 0;
  // Staging entries of key appends per layer (a ring), in [1, 1024]: an append waits only when
  // this many of its layer's earlier appends are still queued for the card. One append per layer
  // per step; the overlap schemes keep at most: sync and pipelined (micro-batches share the
  // step's append) 2, asynchronous reuse C about C + 1 (C steps of appends behind one round of
  // selections, waited for a step later), look-ahead one more. 8 covers reuse up to C = 6.
  int append_ring = 8;
  // How long an append waits for a free entry of its layer's ring when all are in use (the card
  // lags append_ring steps behind: the producer is delayed); past it the card has stopped
  // consuming keys and is declared dead, since its digests would go stale. > 0.
  double append_timeout_ms = 10000;
  // The issuer's copies into staging are real GPU->host copies (counted as bytes_d2h).
  bool device_staging = false;
};
[[nodiscard]] absl::Status ValidateSelectionOffloadOptions(const SelectionOffloadOptions& options);

// Counters of one engine. Times are measured on this host unless named modeled_.
struct OffloadMetrics {
  std::string selector;  // PageSelector::Name()
  int64_t requests = 0;  // select requests the selector thread published
  std::array<int64_t, kNumOffloadReasons> published{};  // ... by reason
  // Consumer side (CPU waits; the GPU side adds its device-resident counters instead).
  int64_t waits = 0;
  std::array<int64_t, kNumOffloadReasons> waited{};
  int64_t appends = 0;
  int64_t appended_tokens = 0;
  // Requests whose functional result took longer on this host than the modeled device time
  // (the emulation could not keep up with the model: the run is host-bound for them).
  int64_t host_bound = 0;
  // Timeouts of requests that queued behind earlier work and started with less than half
  // their deadline left (the card was behind): fallbacks, not failures toward
  // dead_after_failures.
  int64_t late_timeouts = 0;
  double selector_ms = 0;        // measured: Submit..Wait of the selector, summed
  double functional_ms = 0;      // measured: the selector's compute (Costs().relevancy_ms)
  double append_ms = 0;          // measured: AppendKeys, summed
  double modeled_device_ms = 0;  // modeled (emulated card): selections + digest updates
  double modeled_energy_mj = 0;  // modeled
  double bytes_to_card = 0;      // modeled hop to the card: query, table rows, lengths, keys
  double bytes_from_card = 0;    // modeled hop back: pages and counts
  double bytes_d2h = 0;          // real GPU->host staging copies (GPU side; 0 in CPU mode)
  double bytes_h2d = 0;          // real host->GPU copies of selections (GPU side)
  bool dead = false;
  std::string death;    // the failure that declared the selector dead
  int append_ring = 0;  // the engine's append ring depth (options.append_ring)
};

class SelectionOffload {
 public:
  using SlotControl = OffloadSlotControl;
  static constexpr uint32_t ResultSeq(uint64_t r) { return OffloadResultSeq(r); }
  static constexpr int32_t ResultCode(uint64_t r) { return OffloadResultCode(r); }
  // Staging of one request's inputs and outputs (host memory from OffloadHostMemory).
  struct Staging {
    uint8_t* base = nullptr;
    size_t bytes = 0;
    // Byte offsets inside `base`.
    size_t query = 0, table = 0, lens = 0, pages = 0, counts = 0;
  };
  // What the issuer of a select request must write before calling IssueSelect.
  struct SelectPlan {
    int slot = 0;
    int layer = 0;
    QueryView query;       // shape (data: the staging)
    BlockTableView table;  // shape (pointers: the staging)
    SelectionConfig config;
    int pages_per_head = 0;  // k: the staged selection is [num_seqs, num_kv_heads, k]
    int num_kv_heads = 0;
    Staging staging;
    SlotControl* control = nullptr;
  };
  // Pointers of ring entry 0; request seq uses entry OffloadRingEntry(seq, ring), entry_bytes
  // further per entry (IssueAppend resolves them; the GPU gate kernel picks the same entry).
  struct AppendPlan {
    int layer = 0;
    int num_tokens = 0;
    uint8_t* slots = nullptr;  // staging: [num_tokens] int64
    uint8_t* keys = nullptr;   // staging: [num_tokens, num_kv_heads, head_dim] cache dtype
    size_t key_bytes = 0;
    int ring = 1;                    // entries of the layer's ring
    size_t entry_bytes = 0;          // stride between entries
    SlotControl* control = nullptr;  // the layer's append control block
  };

  // Errors: bad options; a null selector or memory.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SelectionOffload>> Create(
      std::unique_ptr<PageSelector> selector, const SelectionOffloadOptions& options,
      OffloadHostMemory memory = PlainHostMemory());
  ~SelectionOffload();  // Shutdown()
  SelectionOffload(const SelectionOffload&) = delete;
  SelectionOffload& operator=(const SelectionOffload&) = delete;

  // Setup, run on the selector thread and waited for (blocking; not for the decode path).
  // Errors: the selector's (a layer added twice, a bad shape, more than max_layers layers).
  [[nodiscard]] absl::Status AddLayer(int layer, const CacheShape& shape);
  // Bulk digests after prefill from a host cache; the cache and table are read before return.
  [[nodiscard]] absl::Status BuildDigests(int layer, const KvCacheView& cache,
                                          const BlockTableView& table);

  // CPU mode: host pointers, the calling thread copies into staging (waiting at the gate for a
  // slot's earlier request at most gate_timeout_ms) and Wait blocks until the result or the
  // deadline. Errors (InvalidArgument naming the value): unknown layer or slot, shapes that do
  // not match the layer, a slot with a request not yet waited for (Submit), or none (Wait).
  [[nodiscard]] absl::Status Append(int layer, const int64_t* slots, int num_tokens,
                                    const void* keys);
  [[nodiscard]] absl::Status Submit(int slot, int layer, const QueryView& query,
                                    const BlockTableView& table, const SelectionConfig& config);
  // Copies the selection into `out` (rows of k pages, the rest -1) when the result is
  // kSelected; leaves `out` untouched otherwise. `out` is [num_seqs, num_kv_heads, >= k].
  [[nodiscard]] absl::StatusOr<OffloadReason> Wait(int slot, const SelectionView& out);

  // The issuer protocol used by the GPU side (and by the CPU mode above):
  //  1. PlanSelect / PlanAppend on the host at enqueue time: checks shapes, sizes the staging
  //     (growing it keeps the old buffer alive until shutdown: a late request may still use it);
  //  2. the issuer passes the gate, writes the inputs into the staging (CPU: memcpy; GPU: the
  //     stage kernel), or sets control->skip when the gate stayed closed;
  //  3. IssueSelect / IssueAppend at stream time (a host function): never blocks, never calls a
  //     GPU API; assigns the sequence number and hands the job to the selector thread.
  // Plan errors are InvalidArgument naming the value.
  // `may_allocate` false (a stream being captured into a graph): staging that would have to
  // grow is a FailedPrecondition asking for an uncaptured warm-up step first.
  [[nodiscard]] absl::StatusOr<SelectPlan> PlanSelect(int slot, int layer, const QueryView& query,
                                                      const BlockTableView& table,
                                                      const SelectionConfig& config,
                                                      bool may_allocate = true);
  [[nodiscard]] absl::StatusOr<AppendPlan> PlanAppend(int layer, int num_tokens,
                                                      bool may_allocate = true);
  // The plan of the slot's outstanding request, for its wait (enqueue time); marks the slot
  // free for its next Submit. FailedPrecondition when the slot has no request to wait for.
  [[nodiscard]] absl::StatusOr<SelectPlan> PlanWait(int slot);
  void IssueSelect(const SelectPlan& plan);
  void IssueAppend(const AppendPlan& plan);

  // Bytes of a request's inputs (query, table rows, lengths).
  static size_t InputBytes(const SelectPlan& plan);

  OffloadMetrics Metrics() const;
  void ResetMetrics();
  // Drains every queued job (each select is published) and joins the selector thread.
  // Idempotent; later Submit/Append fail with FailedPrecondition.
  void Shutdown();

  const SelectionOffloadOptions& options() const { return options_; }
  OffloadHostMemory& memory() { return memory_; }
  double deadline_ms() const { return options_.deadline_ms; }
  double gate_timeout_ms() const {
    return options_.gate_timeout_ms > 0 ? options_.gate_timeout_ms : options_.deadline_ms;
  }
  double append_timeout_ms() const { return options_.append_timeout_ms; }
  int append_ring() const { return options_.append_ring; }
  int slots() const { return options_.slots; }
  bool dead() const { return dead_.load(std::memory_order_acquire); }
  // Not for the decode path: the slot's control block (tests, the GPU side).
  SlotControl* slot_control(int slot) const { return &controls_[slot]; }

 private:
  enum class JobKind : int { kSelect, kAppend, kControl };
  struct Control {
    std::function<absl::Status()> fn;
    absl::Status status;
    bool done = false;
  };
  // Trivially copyable: the channel stores it by value.
  struct Job {
    JobKind kind = JobKind::kSelect;
    uint32_t seq = 0;
    SelectPlan select;
    AppendPlan append;
    Clock::time_point issued;
    Control* control = nullptr;
  };
  struct LayerInfo {
    CacheShape shape;
    int index = 0;   // into the append control blocks
    Staging append;  // the ring: append_ring entries of entry_bytes (slots, then keys)
    size_t entry_bytes = 0;
  };

  SelectionOffload(std::unique_ptr<PageSelector> selector, const SelectionOffloadOptions& options,
                   OffloadHostMemory memory, SlotControl* controls);
  [[nodiscard]] absl::Status RunControl(std::function<absl::Status()> fn);
  void SelectorLoop();
  void RunSelect(const Job& job);
  void RunAppend(const Job& job);
  void Publish(const SelectPlan& plan, uint32_t seq, OffloadReason reason);
  // Counts a failure (selector thread only) and declares the selector dead after
  // dead_after_failures in a row.
  void Fail(absl::string_view what, const absl::Status& status);
  // Declares the selector dead at once (any thread).
  void Die(absl::string_view what, const absl::Status& status);
  bool Push(const Job& job);
  [[nodiscard]] absl::StatusOr<Staging> Grow(Staging current, size_t need, bool may_allocate,
                                             absl::string_view what);
  // CPU mode: waits until the control's next request may write its staging entry
  // (OffloadGateOpen over a ring of `ring`), at most `timeout_ms`.
  bool PassGate(const SlotControl& control, int ring, double timeout_ms) const;

  const SelectionOffloadOptions options_;
  std::unique_ptr<PageSelector> selector_;  // used on the selector thread only
  OffloadHostMemory memory_;
  SlotControl* const controls_;  // [slots + max_layers]: slots, then append controls

  // Enqueue-time state (the caller's thread; guarded for Python callers on several threads).
  mutable std::mutex plan_mu_;
  std::map<int, LayerInfo> layers_;
  std::vector<Staging> slot_staging_;
  std::vector<bool> pending_;  // CPU mode: submitted, not yet waited for
  std::vector<SelectPlan> slot_plan_;
  std::vector<Clock::time_point> submitted_at_;  // CPU mode: when each slot's request was issued
  std::vector<void*> graveyard_;                 // outgrown staging, freed at shutdown
  bool shut_down_ = false;
  // CPU mode: an append's plan, gate, copy and issue, serialized (its ring entry follows from
  // the sequence number its issue will take).
  std::mutex append_mu_;

  // Producer side of the channel: host functions may run on several driver threads, so pushes
  // are serialized by a lock held only for the (wait-free) push.
  std::mutex push_mu_;
  SpscChannel<Job> channel_;
  std::atomic<bool> dead_{false};
  std::atomic<bool> stopping_{false};

  // Wakes CPU-mode waiters after a publish.
  mutable std::mutex wake_mu_;
  mutable std::condition_variable wake_cv_;

  mutable std::mutex metrics_mu_;
  OffloadMetrics metrics_;
  int consecutive_failures_ = 0;    // selector thread only
  Clock::time_point last_job_end_;  // selector thread only: when its latest job ended

  std::thread thread_;  // last: starts after every member above exists
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_SELECTION_OFFLOAD_H_
