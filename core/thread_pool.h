// mempipe core: a bounded, reused pool of host threads behind ForEachSeqHeads (core/parallel.h).
//
// Why a pool: starting a thread per call and per requested thread let a caller ask for any
// number of threads (the Python binding passes `num_threads` through), and a failed
// std::thread constructor while others were joinable ended the process in std::terminate.
// The pool starts at most `max_workers` threads, once, on demand, and keeps them; a thread that
// cannot be started is not an error for the caller: the work runs on the threads that exist,
// the calling thread included (it always takes part), so ParallelFor never fails for lack of
// threads. Reserve() reports such a failure as a Status for callers that want to know.
//
// Concurrency: any number of threads may call ParallelFor at once, nested calls included (the
// caller claims tasks itself, so a call never waits on a worker that is busy elsewhere). An
// exception thrown by a task is rethrown on the calling thread once every task of the call
// has finished (the first one, if several throw).
//
// Waiting: a worker spins (plain loads of an atomic) for new calls until `spin` after its last
// task, also across calls whose tasks the others claimed before it looked, and then sleeps on a
// condition variable; one woken from sleep that finds nothing to claim sleeps again at once. A
// caller whose tasks are all claimed but not yet finished spins up to `spin` too. Decode calls its
// kernels once per layer, back to back, and a worker asleep costs each call a futex wake and a
// reschedule on both sides: on the 2-vCPU build VM about 40 us of CPU time per thread and call,
// as much as a small layer's whole kernel, and the woken helper started so late that two
// threads took longer than one. A worker that slept after losing one call's tasks to the
// others would cost the next call such a wake-up on the caller's path. The default pool spins
// kDefaultSpin; MEMPIPE_POOL_SPIN_US (a whole number of microseconds, 0 = sleep at once) sets it
// for the process. A worker never spins longer than that after its last task, so an idle pool costs
// nothing; and no more workers spin at once than there are hardware threads besides the caller's.
//
// Dispatch: one call at a time takes the pool's slot, publishes its tasks there with atomics
// and bumps `posted_`; spinning workers claim the slot's tasks without taking the pool's mutex,
// so a call on many threads is not a convoy of futex handoffs (every spinner used to take the
// mutex at the same moment to find the batch, and again after its task). A call that finds the
// slot taken (a nested call, or another thread's concurrent one) queues its batch under the
// mutex, as every call did before. On the H100 machine's 16-vCPU host a sparse decode call of
// 192 KiB took 24-43 us on 16 threads against 33-46 before, 14 against 16-19 on 4 threads;
// libgomp's team took 13-14 (integration/bench/results/pool_slot/). With the spin kept through
// lost calls (Waiting, above), SmolLM2's 1.5 MiB sparse layer took 19 us there on 16 threads and
// libgomp's team 20 (integration/bench/results/pool_keep_spinning/). A call of up to 64 tasks
// claims and finishes its tasks on a cache line per task (Slot), and a spinner keeps its place
// across calls: the floor per call (16 threads that only meet) went from 5.35 to 3.95 us there,
// libgomp's team 7.4, and 1.3 to 1.1 us at 2 threads (integration/bench/results/pool_lines/).
//
//   ThreadPool::Default().ParallelFor(num_tasks, /*parallelism=*/8, [&](int task) { ... });
#ifndef MEMPIPE_CORE_THREAD_POOL_H_
#define MEMPIPE_CORE_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace mempipe {

class ThreadPool {
 public:
  // Starts a thread running `body`; throws (std::system_error) when it cannot. Tests inject
  // failures through it.
  using Spawner = std::function<std::thread(std::function<void()> body)>;

  // At most `max_workers` (>= 0) threads besides the callers. `spawner` defaults to
  // std::thread's constructor. `spin`: how long a worker that ran tasks, or a caller waiting
  // for its helpers, spins before it sleeps (negative: 0). `max_spinners`: how many workers may
  // spin at once (negative: the hardware threads minus one, for the caller).
  explicit ThreadPool(int max_workers, Spawner spawner = nullptr,
                      absl::Duration spin = kDefaultSpin, int max_spinners = -1);
  ~ThreadPool();  // stops and joins the workers; no ParallelFor may be running
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  static constexpr absl::Duration kDefaultSpin = absl::Microseconds(50);

  // MEMPIPE_POOL_SPIN_US when set (InvalidArgument naming the value unless it is a whole
  // number of microseconds, 0 to 1000000), else kDefaultSpin.
  static absl::StatusOr<absl::Duration> SpinFromEnv();

  // The process-wide pool: DefaultMaxWorkers() workers at most, started on demand, spinning
  // SpinFromEnv() (kDefaultSpin, with a message on stderr, when the variable is bad).
  static ThreadPool& Default();
  // 2 x the hardware threads, minus the caller, capped at 255 (at least 1).
  static int DefaultMaxWorkers();

  // Runs task(i) for every i in [0, num_tasks) on up to `parallelism` threads, the caller's
  // included; returns when all have run. num_tasks <= 0 does nothing; parallelism < 1 means 1.
  void ParallelFor(int num_tasks, int parallelism, absl::FunctionRef<void(int)> task);

  // Starts workers until there are min(workers, max_workers()). ResourceExhausted naming the
  // counts if the system refuses a thread (the pool keeps the ones it has and tries again on
  // a later call).
  [[nodiscard]] absl::Status Reserve(int workers);

  int max_workers() const { return max_workers_; }
  int num_workers() const;
  absl::Duration spin() const { return spin_; }
  // Workers spinning for the next batch now, or running what their spin found (a diagnostic;
  // it changes as they wake and sleep).
  int num_spinning() const { return spinners_.load(std::memory_order_relaxed); }
  // Workers asleep until a call wakes them (a diagnostic, like num_spinning()).
  int num_sleeping() const;

 private:
  struct Batch;
  // How one call's tasks finish, for a queued batch and for the slot alike: the count of
  // finished tasks, the first exception, and where a caller done spinning sleeps.
  struct Completion {
    std::atomic<int> finished{0};
    std::mutex mu;  // guards error; a caller done spinning sleeps on `done` under it
    std::condition_variable done;
    std::exception_ptr error;
    // Runs task(i), keeping its exception if it is the first.
    void Call(absl::FunctionRef<void(int)> task, int i);
    // Runs task(i) of a call of n tasks (Call) and counts it finished.
    void Run(absl::FunctionRef<void(int)> task, int i, int n);
    // Spins up to `spin`, then sleeps, until n tasks have finished (WaitUntil).
    std::exception_ptr Wait(absl::Duration spin, int n);
    // Spins up to `spin` until complete(acquire), then sleeps on `done` until
    // complete(seq_cst), with *asleep (if given) set meanwhile; returns the first exception (and
    // clears it, for the slot's next call). A thread that makes complete() true notifies `done`
    // under `mu`: always, or (after a seq_cst store) once it reads *asleep set.
    template <typename Done>
    std::exception_ptr WaitUntil(absl::Duration spin, std::atomic<bool>* asleep, Done complete);
  };
  // One task's place in a slot call of at most kLineTasks tasks, on a cache line of its own:
  // 2e while call e's task is running, 2e + 1 once it has finished (e counts the slot's calls
  // from 1; 0 is never claimed).
  struct alignas(64) TaskLine {
    std::atomic<uint64_t> state{0};
  };
  static constexpr int kLineTasks = 64;
  // The fast path's batch, owned by the pool and reused by one call at a time (ParallelFor).
  // `call` packs the call's number e (high bits) with its task count n (low 7 bits) when
  // n <= kLineTasks, and 0 for n there otherwise.
  // - A call of at most kLineTasks tasks (every ForEachItemRange call: a task per thread) has a
  //   TaskLine per task. A thread claims task i by moving its line from below 2e to 2e with a
  //   compare-exchange, and marks it 2e + 1 when it has run. The worker of index w starts
  //   looking at task (w + 1) % n and the caller at 0, so the threads of a call each find a
  //   task of their own at once, and each line is written only by the thread that claims it:
  //   no read-modify-write on a line that the other threads of the call also write.
  //   A thread that read an earlier call's (e, n) cannot claim: every line below that n is
  //   at or past 2e + 1 once call e has ended.
  // - A larger call uses `claim`, which packs its task count (high 32 bits) with the next task
  //   index (low 32 bits): a worker claims a task by incrementing it and runs task i where the
  //   value it got was (n, i) with i < n; and counts it in `completion.finished`.
  // Either way a thread reads the task only after its claim, so it always runs a task of the
  // call that was current when it claimed, and that call cannot end (nor the slot be reused)
  // before the claimed task has finished. The fields that change on every call lie on cache
  // lines of their own, apart from `posted_`, which the spinners read.
  struct Slot {
    std::atomic<bool> busy{false};  // a caller owns the slot
    std::atomic<const absl::FunctionRef<void(int)>*> task{nullptr};
    uint64_t calls = 0;                          // the slot calls so far (its owner's)
    alignas(64) std::atomic<uint64_t> call{0};   // (e << 7) | n, or 0 (the claim path)
    alignas(64) std::atomic<uint64_t> claim{0};  // (num_tasks << 32) | next index
    alignas(64) Completion completion;
    // The caller of a line call gave up spinning and waits on completion.done.
    alignas(64) std::atomic<bool> caller_asleep{false};
    TaskLine lines[kLineTasks];
  };
  void WorkerLoop(int index);
  // Runs the batch's unclaimed tasks; whether it ran any.
  static bool Drain(Batch& batch);
  // Runs the slot's unclaimed tasks, looking first at task `home` (mod n) of a line call;
  // whether it ran any. No lock is taken.
  bool DrainSlot(int home);
  // The line call (e, n)'s task i: runs it, keeping its exception, and marks it finished.
  void RunLineTask(const absl::FunctionRef<void(int)>& task, uint64_t e, int i);
  // Whether every task of line call (e, n) has finished (`order` for the lines' loads).
  bool LinesFinished(uint64_t e, int n, std::memory_order order) const;
  // Whether the slot has a task nobody claimed yet.
  bool SlotHasWork() const;
  // Runs the tasks of the first queued batch that has unclaimed ones (mu_ taken and released);
  // whether it ran any.
  bool DrainQueue();
  // Drops the batches at the front of queue_ whose tasks are all claimed (mu_ held).
  void PopClaimedLocked();
  // The fast path of ParallelFor (the caller owns slot_).
  void RunInSlot(int num_tasks, int helpers, absl::FunctionRef<void(int)> task);
  // Wakes up to `helpers` sleeping workers, fewer the spinning ones (who see `posted_`).
  void WakeFor(int helpers);

  const int max_workers_;
  const absl::Duration spin_;
  const int max_spinners_;
  Spawner spawner_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Batch>> queue_;  // batches with tasks left to claim (mu_)
  std::atomic<int> queued_{0};                // queue_.size(), changed under mu_
  std::vector<std::thread> workers_;          // (mu_)
  std::atomic<int> started_{0};               // workers_.size(), changed under mu_
  std::atomic<bool> stopping_{false};         // set under mu_
  // Workers waiting on wake_ (changed under mu_; read without it by callers, sequentially
  // consistent with the slot's claim so that a caller either sees a worker about to sleep or
  // the worker sees the caller's tasks).
  std::atomic<int> sleepers_{0};
  // Workers holding a place to spin: spinning for the next batch, or running the tasks a spin
  // found (a spinner keeps its place across back-to-back calls, so that taking and giving it
  // back, two read-modify-writes on one line by every worker, stay off each call's path).
  std::atomic<int> spinners_{0};
  // Bumped after every push to queue_, every call published in slot_, and at shutdown: what
  // spinning workers watch.
  alignas(64) std::atomic<uint64_t> posted_{0};
  alignas(64) Slot slot_;
};

}  // namespace mempipe

#endif  // MEMPIPE_CORE_THREAD_POOL_H_
