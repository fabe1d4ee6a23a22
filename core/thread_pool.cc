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
  std::atomic<int> next{0};
  std::mutex mu;
  std::condition_variable done;
  int finished = 0;          // guarded by mu
  std::exception_ptr error;  // guarded by mu

  Batch(absl::FunctionRef<void(int)> t, int n) : task(t), num_tasks(n) {}
};

ThreadPool::ThreadPool(int max_workers, Spawner spawner)
    : max_workers_(std::max(max_workers, 0)), spawner_(std::move(spawner)) {
  if (!spawner_) {
    spawner_ = [](std::function<void()> body) { return std::thread(std::move(body)); };
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
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

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Batch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      batch = queue_.front();
      // A batch leaves the queue once its tasks are all claimed.
      if (batch->next.load(std::memory_order_relaxed) >= batch->num_tasks) {
        queue_.pop_front();
        continue;
      }
    }
    Drain(*batch);
    std::lock_guard<std::mutex> lock(mu_);
    if (!queue_.empty() && queue_.front() == batch) queue_.pop_front();
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
  auto batch = std::make_shared<Batch>(task, num_tasks);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(batch);
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
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace mempipe
