#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mempipe {

// One queued ParallelFor call. Tasks are claimed with `next`. The task reference is only used
// by a thread that claimed an index below `num_tasks`, and the caller returns only once all of
// those have finished, so it never dangles. Every thread that drains a batch holds a reference
// to it, so the last one to finish can still notify after the caller has seen the count
// complete and returned.
struct ThreadPool::Batch {
  absl::FunctionRef<void(int)> task;
  int num_tasks;
  std::atomic<int> next{0};
  Completion completion;

  Batch(absl::FunctionRef<void(int)> t, int n) : task(t), num_tasks(n) {}
};

namespace {

// Spins until done() or `spin` has passed; true when done() held. The loop is plain loads,
// with no pause hint: under KVM a loop of PAUSE instructions can exit to the host (pause-loop
// exiting). On the H200 host's KVM guest a PAUSE in the loop made no measurable difference
// (integration/bench/results/pool_spin2/).
template <typename Done>
bool SpinUntil(std::chrono::steady_clock::time_point deadline, Done done) {
  for (;;) {
    for (int i = 0; i < 256; ++i) {
      if (done()) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}
template <typename Done>
bool SpinUntil(absl::Duration spin, Done done) {
  if (spin <= absl::ZeroDuration()) return done();
  return SpinUntil(std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(spin), done);
}

}  // namespace

ThreadPool::ThreadPool(int max_workers, Spawner spawner, absl::Duration spin, int max_spinners)
    : max_workers_(std::max(max_workers, 0)),
      spin_(std::max(spin, absl::ZeroDuration())),
      max_spinners_(max_spinners >= 0
                        ? max_spinners
                        : std::max(static_cast<int>(std::thread::hardware_concurrency()) - 1, 0)),
      spawner_(std::move(spawner)) {
  if (!spawner_) {
    spawner_ = [](std::function<void()> body) { return std::thread(std::move(body)); };
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_.store(true, std::memory_order_release);
    posted_.fetch_add(1, std::memory_order_release);  // spinning workers look again
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

absl::StatusOr<absl::Duration> ThreadPool::SpinFromEnv() {
  const char* env = std::getenv("MEMPIPE_POOL_SPIN_US");
  if (env == nullptr) return kDefaultSpin;
  int64_t us = -1;
  if (!absl::SimpleAtoi(env, &us) || us < 0 || us > 1000000) {
    return absl::InvalidArgumentError(
        absl::StrCat("MEMPIPE_POOL_SPIN_US=\"", env,
                     "\": expected a whole number of microseconds from 0 to 1000000"));
  }
  return absl::Microseconds(us);
}

ThreadPool& ThreadPool::Default() {
  // Never destroyed: workers may still be parked when static destructors run.
  static ThreadPool* pool = [] {
    absl::StatusOr<absl::Duration> spin = SpinFromEnv();
    if (!spin.ok()) {
      std::fprintf(stderr, "mempipe: %s; the host thread pool spins %s\n",
                   std::string(spin.status().message()).c_str(),
                   absl::FormatDuration(kDefaultSpin).c_str());
    }
    return new ThreadPool(DefaultMaxWorkers(), nullptr, spin.value_or(kDefaultSpin));
  }();
  return *pool;
}

int ThreadPool::DefaultMaxWorkers() {
  // Once per process: std::thread::hardware_concurrency() is glibc's get_nprocs(), which opens,
  // reads and closes /sys/devices/system/cpu/online on every call, and every kernel call that
  // splits its items (ForEachItemRange) asks. On the 2-vCPU build VM those three system calls
  // took 6-9 us of each SparseDecode call (SmolLM2, one sequence, one thread: 26-34 us before).
  static const int workers = [] {
    const int hw = static_cast<int>(std::thread::hardware_concurrency());
    return std::clamp(2 * std::max(hw, 1) - 1, 1, 255);
  }();
  return workers;
}

int ThreadPool::num_workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(workers_.size());
}

int ThreadPool::num_sleeping() const { return sleepers_.load(std::memory_order_relaxed); }

absl::Status ThreadPool::Reserve(int workers) {
  const int want = std::clamp(workers, 0, max_workers_);
  std::lock_guard<std::mutex> lock(mu_);
  while (static_cast<int>(workers_.size()) < want) {
    try {
      const int index = static_cast<int>(workers_.size());
      workers_.push_back(spawner_([this, index] { WorkerLoop(index); }));
      started_.store(static_cast<int>(workers_.size()), std::memory_order_release);
    } catch (const std::exception& e) {
      return absl::ResourceExhaustedError(
          absl::StrCat("could not start host thread ", workers_.size() + 1, " of ", want, ": ",
                       e.what(), " (running on ", workers_.size(), " pool threads)"));
    }
  }
  return absl::OkStatus();
}

void ThreadPool::Completion::Call(absl::FunctionRef<void(int)> task, int i) {
  try {
    task(i);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu);
    if (!error) error = std::current_exception();
  }
}

void ThreadPool::Completion::Run(absl::FunctionRef<void(int)> task, int i, int n) {
  Call(task, i);
  // acq_rel: the caller that sees the count complete sees every task's writes.
  if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
    std::lock_guard<std::mutex> lock(mu);  // a caller asleep on `done` is woken
    done.notify_all();
  }
}

template <typename Done>
std::exception_ptr ThreadPool::Completion::WaitUntil(absl::Duration spin, std::atomic<bool>* asleep,
                                                     Done complete) {
  if (!SpinUntil(spin, [&] { return complete(std::memory_order_acquire); })) {
    std::unique_lock<std::mutex> lock(mu);
    // seq_cst, with the seq_cst loads of the wait's checks: see RunLineTask.
    if (asleep != nullptr) asleep->store(true, std::memory_order_seq_cst);
    done.wait(lock, [&] { return complete(std::memory_order_seq_cst); });
    if (asleep != nullptr) asleep->store(false, std::memory_order_relaxed);
  }
  std::lock_guard<std::mutex> lock(mu);
  return std::exchange(error, nullptr);
}

std::exception_ptr ThreadPool::Completion::Wait(absl::Duration spin, int n) {
  return WaitUntil(spin, nullptr,
                   [&](std::memory_order order) { return finished.load(order) == n; });
}

bool ThreadPool::Drain(Batch& b) {
  bool ran = false;
  for (;;) {
    const int i = b.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= b.num_tasks) return ran;
    ran = true;
    b.completion.Run(b.task, i, b.num_tasks);
  }
}

void ThreadPool::RunLineTask(const absl::FunctionRef<void(int)>& task, uint64_t e, int i) {
  slot_.completion.Call(task, i);
  // seq_cst, and the load of caller_asleep after it: a caller that gave up spinning either
  // sees this task finished before it waits or is seen asleep here and woken (WaitUntil).
  slot_.lines[i].state.store(2 * e + 1, std::memory_order_seq_cst);
  if (slot_.caller_asleep.load(std::memory_order_seq_cst)) {
    std::lock_guard<std::mutex> lock(slot_.completion.mu);
    slot_.completion.done.notify_all();
  }
}

bool ThreadPool::LinesFinished(uint64_t e, int n, std::memory_order order) const {
  for (int i = 0; i < n; ++i) {
    if (slot_.lines[i].state.load(order) != 2 * e + 1) return false;
  }
  return true;
}

bool ThreadPool::DrainSlot(int home) {
  // acquire: the call word is published by a release (seq_cst) store after the task pointer.
  const uint64_t call = slot_.call.load(std::memory_order_acquire);
  const int n = static_cast<int>(call & 127);
  if (n > 0) {
    const uint64_t e = call >> 7;
    bool ran = false;
    for (int k = 0, i = home % n; k < n; ++k, i = i + 1 == n ? 0 : i + 1) {
      uint64_t state = slot_.lines[i].state.load(std::memory_order_relaxed);
      // Claimed or finished by call e, or by a later call (this thread read an earlier one).
      if (state >= 2 * e) continue;
      if (!slot_.lines[i].state.compare_exchange_strong(state, 2 * e, std::memory_order_relaxed)) {
        continue;  // another thread claimed it
      }
      ran = true;
      RunLineTask(*slot_.task.load(std::memory_order_relaxed), e, i);
    }
    return ran;
  }
  bool ran = false;
  for (;;) {
    // Look before claiming, so that the index passes the count by at most one per thread and
    // call (the next call's store resets it).
    const uint64_t seen = slot_.claim.load(std::memory_order_relaxed);
    if ((seen & 0xffffffffu) >= (seen >> 32)) return ran;
    // The increment returns the claim as it stood: (n, i) of the call that is current then,
    // whichever call this worker looked at. acquire: the claim was published by a release
    // store, and the increments after it continue its release sequence, so task i's call's
    // task pointer is visible; that call cannot end (nor the slot be reused) before task i has
    // finished. One increment per task, not a compare-exchange that up to 15 spinners retry on
    // the same cache line.
    const uint64_t c = slot_.claim.fetch_add(1, std::memory_order_acquire);
    const int m = static_cast<int>(c >> 32), i = static_cast<int>(c & 0xffffffffu);
    if (i >= m) return ran;
    ran = true;
    slot_.completion.Run(*slot_.task.load(std::memory_order_relaxed), i, m);
  }
}

bool ThreadPool::SlotHasWork() const {
  // seq_cst: paired with RunInSlot's store of the call and WakeFor's load of sleepers_.
  const uint64_t call = slot_.call.load(std::memory_order_seq_cst);
  const int n = static_cast<int>(call & 127);
  if (n > 0) {
    const uint64_t e = call >> 7;
    for (int i = 0; i < n; ++i) {
      if (slot_.lines[i].state.load(std::memory_order_relaxed) < 2 * e) return true;
    }
    return false;
  }
  const uint64_t c = slot_.claim.load(std::memory_order_seq_cst);
  return (c & 0xffffffffu) < (c >> 32);
}

void ThreadPool::PopClaimedLocked() {
  // A batch leaves the queue once its tasks are all claimed.
  while (!queue_.empty() &&
         queue_.front()->next.load(std::memory_order_relaxed) >= queue_.front()->num_tasks) {
    queue_.pop_front();
  }
  queued_.store(static_cast<int>(queue_.size()), std::memory_order_release);
}

bool ThreadPool::DrainQueue() {
  std::shared_ptr<Batch> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    PopClaimedLocked();
    if (queue_.empty()) return false;
    batch = queue_.front();
  }
  return Drain(*batch);
}

void ThreadPool::WorkerLoop(int index) {
  using Clock = std::chrono::steady_clock;
  bool ran_tasks = false;      // ran a task since it last found nothing to claim
  bool spinner = false;        // holds one of the max_spinners_ places
  Clock::time_point spin_end;  // spin_ after its last task: until then it spins for new calls
  for (;;) {
    // Read before looking for work: a post after this read ends the spin below at once.
    const uint64_t seen = posted_.load(std::memory_order_acquire);
    bool ran = DrainSlot(index + 1);
    if (queued_.load(std::memory_order_acquire) > 0) ran = DrainQueue() || ran;
    if (ran) {
      ran_tasks = true;
      continue;
    }
    if (stopping_.load(std::memory_order_acquire)) {
      if (spinner) spinners_.fetch_sub(1, std::memory_order_relaxed);
      return;
    }
    // Nothing to claim. A worker spins for the next call until spin_ after its last task, and
    // keeps spinning when a call's tasks were all claimed before it looked, so the spinners are
    // the threads that the calls of the last spin_ used. One woken from sleep that finds nothing
    // sleeps again at once. At most max_spinners_ spin at once, so that spinners never crowd out
    // the threads with work on a machine with fewer cores than threads. A spinner keeps its
    // place through the tasks its spin finds, and gives it back when it goes to sleep.
    const Clock::time_point now = Clock::now();
    if (ran_tasks) spin_end = now + absl::ToChronoNanoseconds(spin_);
    ran_tasks = false;
    if (now < spin_end && !spinner) {  // takes one of the max_spinners_ places, if one is free
      int spinning = spinners_.load(std::memory_order_relaxed);
      while (spinning < max_spinners_ &&
             !spinners_.compare_exchange_weak(spinning, spinning + 1, std::memory_order_relaxed)) {
      }
      spinner = spinning < max_spinners_;
    }
    if (spinner && now < spin_end &&
        SpinUntil(spin_end, [&] { return posted_.load(std::memory_order_acquire) != seen; })) {
      continue;
    }
    if (spinner) {
      spinners_.fetch_sub(1, std::memory_order_relaxed);
      spinner = false;
    }
    spin_end = Clock::time_point();  // asleep: a wake-up that finds nothing sleeps again
    std::unique_lock<std::mutex> lock(mu_);
    // seq_cst (with SlotHasWork's load): a caller that published its tasks before this
    // increment is seen by the wait's first check; one after it sees this sleeper and wakes it
    // under mu_, which it can only take once this worker waits.
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] {
      PopClaimedLocked();
      return stopping_.load(std::memory_order_relaxed) || !queue_.empty() || SlotHasWork();
    });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void ThreadPool::WakeFor(int helpers) {
  // Spinning workers need no wake-up; sleeping ones are woken for the helpers still wanted.
  // A count that is off by a worker changing state only changes how many threads help.
  const int sleepers = sleepers_.load(std::memory_order_seq_cst);
  const int wake = std::min(sleepers, helpers - spinners_.load(std::memory_order_relaxed));
  if (wake <= 0) return;
  {
    // Taken and released before notifying: a worker between its last check and its wait
    // holds mu_, so it is waiting by now and is woken.
    std::lock_guard<std::mutex> lock(mu_);
  }
  if (wake >= sleepers) {
    wake_.notify_all();
  } else {
    for (int i = 0; i < wake; ++i) wake_.notify_one();
  }
}

void ThreadPool::RunInSlot(int num_tasks, int helpers, absl::FunctionRef<void(int)> task) {
  // The slot is ours: every task of the last call finished, so no worker uses these fields.
  slot_.task.store(&task, std::memory_order_relaxed);
  const bool lines = num_tasks <= kLineTasks;
  const uint64_t e = ++slot_.calls;
  if (!lines) {
    slot_.completion.finished.store(0, std::memory_order_relaxed);
    // seq_cst: a release of the fields above for the workers' acquiring increments (the call
    // word of every claim call is 0, so reading it synchronizes with none in particular).
    slot_.claim.store(static_cast<uint64_t>(num_tasks) << 32, std::memory_order_seq_cst);
  }
  // seq_cst: a release (the fields above) that is also ordered against WakeFor's load of
  // sleepers_ (see WorkerLoop).
  slot_.call.store(lines ? (e << 7) | static_cast<uint64_t>(num_tasks) : 0,
                   std::memory_order_seq_cst);
  posted_.fetch_add(1, std::memory_order_release);  // spinning workers take it from here
  WakeFor(helpers);
  DrainSlot(0);
  const std::exception_ptr error =
      lines ? slot_.completion.WaitUntil(
                  spin_, &slot_.caller_asleep,
                  [&](std::memory_order order) { return LinesFinished(e, num_tasks, order); })
            : slot_.completion.Wait(spin_, num_tasks);
  slot_.busy.store(false, std::memory_order_release);
  if (error) std::rethrow_exception(error);
}

void ThreadPool::ParallelFor(int num_tasks, int parallelism, absl::FunctionRef<void(int)> task) {
  if (num_tasks <= 0) return;
  const int helpers = std::min({std::max(parallelism, 1), num_tasks}) - 1;
  if (helpers == 0 || max_workers_ == 0) {
    for (int i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  // A refused thread only means fewer helpers: the caller runs what nobody else claims.
  if (started_.load(std::memory_order_acquire) < std::min(helpers, max_workers_)) {
    (void)Reserve(helpers);
  }
  // acquire: pairs with the last owner's release, after its tasks all finished.
  if (!slot_.busy.exchange(true, std::memory_order_acquire)) {
    RunInSlot(num_tasks, helpers, task);
    return;
  }
  auto batch = std::make_shared<Batch>(task, num_tasks);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(batch);
    queued_.store(static_cast<int>(queue_.size()), std::memory_order_release);
    posted_.fetch_add(1, std::memory_order_release);  // spinning workers take it from here
  }
  WakeFor(helpers);
  Drain(*batch);
  const std::exception_ptr error = batch->completion.Wait(spin_, num_tasks);
  {
    std::lock_guard<std::mutex> q(mu_);
    auto it = std::find(queue_.begin(), queue_.end(), batch);
    if (it != queue_.end()) queue_.erase(it);
    queued_.store(static_cast<int>(queue_.size()), std::memory_order_release);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace mempipe
