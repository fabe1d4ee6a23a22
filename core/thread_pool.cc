#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"

namespace mempipe {

// One ParallelFor call. Tasks are claimed with `next`; `finished` counts completed ones. The
// task reference is only used by a thread that claimed an index below `num_tasks`, and the
// caller returns only once all of those have finished, so it never dangles.
struct ThreadPool::Batch {
  absl::FunctionRef<void(int)> task;
  int num_tasks;
  int helper_slots;  // workers that may still join (the call's parallelism - 1); guarded by
                     // the pool's mu_
  std::atomic<int> next{0};
  std::mutex mu;
  std::condition_variable done;
  int finished = 0;          // guarded by mu
  std::exception_ptr error;  // guarded by mu

  Batch(absl::FunctionRef<void(int)> t, int n, int helpers)
      : task(t), num_tasks(n), helper_slots(helpers) {}
};

ThreadPool::ThreadPool(int max_workers, Spawner spawner, std::chrono::nanoseconds spin)
    : max_workers_(std::max(max_workers, 0)),
      spawner_(std::move(spawner)),
      spin_(std::max(spin, std::chrono::nanoseconds{0})) {
  if (!spawner_) {
    spawner_ = [](std::function<void()> body) { return std::thread(std::move(body)); };
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    stopping_hint_.store(true, std::memory_order_release);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

ThreadPool& ThreadPool::Default() {
  // Never destroyed: workers may still be parked when static destructors run.
  static ThreadPool* pool = new ThreadPool(DefaultMaxWorkers());
  return *pool;
}

int ThreadPool::DefaultMaxWorkers() {
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(2 * std::max(hw, 1) - 1, 1, 255);
}

int ThreadPool::num_workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(workers_.size());
}

absl::Status ThreadPool::Reserve(int workers) {
  const int want = std::clamp(workers, 0, max_workers_);
  std::lock_guard<std::mutex> lock(mu_);
  while (static_cast<int>(workers_.size()) < want) {
    try {
      workers_.push_back(spawner_([this] { WorkerLoop(); }));
    } catch (const std::exception& e) {
      return absl::ResourceExhaustedError(
          absl::StrCat("could not start host thread ", workers_.size() + 1, " of ", want, ": ",
                       e.what(), " (running on ", workers_.size(), " pool threads)"));
    }
  }
  return absl::OkStatus();
}

void ThreadPool::Drain(Batch& b) {
  for (;;) {
    const int i = b.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= b.num_tasks) return;
    std::exception_ptr error;
    try {
      b.task(i);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(b.mu);
    if (error && !b.error) b.error = error;
    if (++b.finished == b.num_tasks) b.done.notify_all();
  }
}

bool ThreadPool::SpinForWork() const {
  if (spin_.count() == 0) return false;
  const auto deadline = std::chrono::steady_clock::now() + spin_;
  for (;;) {
    for (int i = 0; i < 64; ++i) {  // ~64 pause latencies between clock reads
      if (queued_.load(std::memory_order_acquire) != 0 ||
          stopping_hint_.load(std::memory_order_acquire)) {
        return true;
      }
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
  }
}

std::shared_ptr<ThreadPool::Batch> ThreadPool::OpenBatch() {
  for (auto it = queue_.begin(); it != queue_.end();) {
    Batch& b = **it;
    if (b.next.load(std::memory_order_relaxed) >= b.num_tasks) {
      it = queue_.erase(it);  // a batch leaves the queue once its tasks are all claimed
      continue;
    }
    if (b.helper_slots > 0) return *it;
    ++it;
  }
  queued_.store(queue_.size(), std::memory_order_release);
  return nullptr;
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Batch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!stopping_ && (batch = OpenBatch()) == nullptr) {
        lock.unlock();
        SpinForWork();
        lock.lock();
      }
      // A call takes at most its parallelism - 1 workers: the others, polling or woken, leave
      // its tasks to those (on a machine with as many threads as cores, a worker beyond the
      // call's count would only take a core from one that has a share).
      wake_.wait(lock, [&] { return stopping_ || (batch = OpenBatch()) != nullptr; });
      if (batch == nullptr) return;  // stopping
      --batch->helper_slots;
      queued_.store(queue_.size(), std::memory_order_release);
    }
    Drain(*batch);
  }
}

void ThreadPool::ParallelFor(int num_tasks, int parallelism, absl::FunctionRef<void(int)> task) {
  if (num_tasks <= 0) return;
  const int helpers = std::min({std::max(parallelism, 1), num_tasks}) - 1;
  if (helpers == 0 || max_workers_ == 0) {
    for (int i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  // A refused thread only means fewer helpers: the caller runs what nobody else claims.
  (void)Reserve(helpers);
  auto batch = std::make_shared<Batch>(task, num_tasks, helpers);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(batch);
    queued_.store(queue_.size(), std::memory_order_release);
  }
  if (helpers >= num_workers()) {
    wake_.notify_all();
  } else {
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
  }
  Drain(*batch);
  std::unique_lock<std::mutex> lock(batch->mu);
  batch->done.wait(lock, [&] { return batch->finished == batch->num_tasks; });
  std::exception_ptr error = batch->error;
  lock.unlock();
  {
    std::lock_guard<std::mutex> q(mu_);
    auto it = std::find(queue_.begin(), queue_.end(), batch);
    if (it != queue_.end()) queue_.erase(it);
    queued_.store(queue_.size(), std::memory_order_release);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace mempipe
