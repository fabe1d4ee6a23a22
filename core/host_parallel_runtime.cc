#include "core/host_parallel_runtime.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <exception>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/thread_pool.h"

namespace mempipe {
namespace {

// Raises `a` to at least v (relaxed: a diagnostic or a size, nothing published through it);
// returns the value it holds then.
int AtomicMax(std::atomic<int>& a, int v) {
  int cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
  return std::max(cur, v);
}

struct Runtime {
  OpenMpEntryPoints entry;
  std::string name;
  // The largest team a call has asked for: every call asks the runtime for this many threads,
  // and those past its own share run none of its tasks. libgomp forms its team again whenever
  // the size asked for changes, and decode alternates sizes on every layer (the relevancy scan
  // asks for 16 threads on a 16-thread host, top-k for its 12 or 8 rows): on the H100 machine's
  // 16-vCPU Xeon the scan took 59-62 us a SmolLM2 layer that way, 18 us on a team of one size
  // (integration/bench/results/pool_keep_spinning/).
  mutable std::atomic<int> team{0};
};

// Installed runtimes are kept for the life of the process (a call that loaded the pointer may
// still be using its runtime after a reset or another install), so none is ever freed.
std::mutex& RegistryMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}
std::vector<std::unique_ptr<Runtime>>& Registry() {  // guarded by RegistryMutex()
  static auto* registry = new std::vector<std::unique_ptr<Runtime>>;
  return *registry;
}

// The runtime HostParallelFor uses (nullptr: mempipe's pool). Acquire/release: a caller that
// sees the pointer sees the Runtime it points to fully built.
std::atomic<const Runtime*> g_current{nullptr};

// Diagnostics only (relaxed: no other memory is published through them).
std::atomic<int64_t> g_team_calls{0};
std::atomic<int> g_last_call_threads{0};
std::atomic<int> g_max_call_threads{0};
std::atomic<int> g_last_call_team{0};

// One HostParallelFor call on a runtime's team. `claimed[i]` makes task i run exactly once even
// if the runtime reports team sizes or thread numbers that do not cover the tasks (the caller
// runs the unclaimed ones after the region).
struct TeamCall {
  absl::FunctionRef<void(int)> task;
  int num_tasks;
  const OpenMpEntryPoints* entry;
  std::unique_ptr<std::atomic<bool>[]> claimed;
  int threads;                      // how many team threads may run its tasks
  std::atomic<uint64_t> ran_by{0};  // bit min(t, 63): team thread t ran a task
  std::atomic<int> team{0};         // the team size the runtime reported
  std::mutex mu;
  std::exception_ptr error;  // guarded by mu: the first task exception

  TeamCall(absl::FunctionRef<void(int)> t, int n, int k, const OpenMpEntryPoints* e)
      : task(t), num_tasks(n), entry(e), claimed(new std::atomic<bool>[n]()), threads(k) {}

  // Runs task i unless someone else claimed it; records (does not throw) its exception.
  void Run(int i, int thread) {
    // The load skips claimed tasks without taking their cache line for writing. acq_rel on the
    // exchange: whoever wins it is the one thread that runs task i.
    if (claimed[i].load(std::memory_order_relaxed) ||
        claimed[i].exchange(true, std::memory_order_acq_rel)) {
      return;
    }
    ran_by.fetch_or(uint64_t{1} << std::min(thread, 63), std::memory_order_relaxed);
    try {
      task(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
};

// The body every team thread runs (GOMP_parallel's fn): its static round-robin share first,
// then whatever no other thread has started. NOTE: the second pass matters on a loaded machine:
// a team thread that is not scheduled for a while would otherwise leave its share waiting, with
// the others idle at the region's end barrier (they still wait there for it to arrive, but not
// for its share of the work).
void TeamBody(void* data) {
  TeamCall& call = *static_cast<TeamCall*>(data);
  const int n = std::max(call.entry->num_threads(), 1);
  const int t = call.entry->thread_num();
  if (t < 0 || t >= n) return;  // a runtime reporting nonsense: the caller runs the tasks
  AtomicMax(call.team, n);
  // Threads past the call's own (the team is the runtime's largest, Runtime::team) run nothing.
  const int k = std::min(n, call.threads);
  if (t >= k) return;
  for (int i = t; i < call.num_tasks; i += k) call.Run(i, t);
  for (int i = 0; i < call.num_tasks; ++i) call.Run(i, t);
}

void RunOnTeam(const Runtime& rt, int num_tasks, int threads, absl::FunctionRef<void(int)> task) {
  const int team = AtomicMax(rt.team, threads);
  TeamCall call(task, num_tasks, threads, &rt.entry);
  rt.entry.parallel(&TeamBody, &call, static_cast<unsigned>(team), /*flags=*/0);
  // The region's end joined the team: everything its threads did happened before this point.
  for (int i = 0; i < num_tasks; ++i) call.Run(i, 0);
  const int seen = std::popcount(call.ran_by.load(std::memory_order_relaxed));
  g_team_calls.fetch_add(1, std::memory_order_relaxed);
  g_last_call_threads.store(seen, std::memory_order_relaxed);
  g_last_call_team.store(call.team.load(std::memory_order_relaxed), std::memory_order_relaxed);
  AtomicMax(g_max_call_threads, seen);
  if (call.error) std::rethrow_exception(call.error);
}

}  // namespace

absl::Status InstallHostParallelRuntime(const OpenMpEntryPoints& entry, const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("host parallel runtime name is empty");
  const char* missing = entry.parallel == nullptr      ? "parallel (GOMP_parallel)"
                        : entry.thread_num == nullptr  ? "thread_num (omp_get_thread_num)"
                        : entry.num_threads == nullptr ? "num_threads (omp_get_num_threads)"
                                                       : nullptr;
  if (missing != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("host parallel runtime '", name, "': entry point ", missing, " is null"));
  }
  auto rt = std::make_unique<Runtime>();
  rt->entry = entry;
  rt->name = name;
  std::lock_guard<std::mutex> lock(RegistryMutex());
  g_current.store(rt.get(), std::memory_order_release);
  Registry().push_back(std::move(rt));
  return absl::OkStatus();
}

absl::Status InstallLoadedOpenMpRuntime(const std::string& library_path) {
  if (library_path.empty()) {
    return absl::InvalidArgumentError("OpenMP runtime library path is empty");
  }
  // RTLD_NOLOAD: only a library the process already has (the one its OpenMP regions use); the
  // reference it takes is never dropped, so the entry points stay valid.
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) {
    const char* why = dlerror();
    return absl::NotFoundError(absl::StrCat(
        "OpenMP runtime '", library_path,
        "' is not loaded in this process (dlopen: ", why != nullptr ? why : "no message", ")"));
  }
  OpenMpEntryPoints entry;
  const char* symbols[] = {"GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"};
  void* found[3] = {};
  for (int i = 0; i < 3; ++i) {
    found[i] = dlsym(handle, symbols[i]);
    if (found[i] == nullptr) {
      return absl::NotFoundError(absl::StrCat("library '", library_path, "' has no symbol ",
                                              symbols[i],
                                              " (not an OpenMP runtime with the GNU libgomp ABI)"));
    }
  }
  entry.parallel = reinterpret_cast<decltype(entry.parallel)>(found[0]);
  entry.thread_num = reinterpret_cast<decltype(entry.thread_num)>(found[1]);
  entry.num_threads = reinterpret_cast<decltype(entry.num_threads)>(found[2]);
  return InstallHostParallelRuntime(entry, library_path);
}

void ResetHostParallelRuntime() { g_current.store(nullptr, std::memory_order_release); }

HostParallelRuntimeInfo GetHostParallelRuntimeInfo() {
  HostParallelRuntimeInfo info;
  if (const Runtime* rt = g_current.load(std::memory_order_acquire)) {
    info.installed = true;
    info.name = rt->name;
  }
  info.team_calls = g_team_calls.load(std::memory_order_relaxed);
  info.last_call_threads = g_last_call_threads.load(std::memory_order_relaxed);
  info.max_call_threads = g_max_call_threads.load(std::memory_order_relaxed);
  info.last_call_team = g_last_call_team.load(std::memory_order_relaxed);
  return info;
}

void HostParallelFor(int num_tasks, int parallelism, absl::FunctionRef<void(int)> task) {
  if (num_tasks <= 0) return;
  const int threads = std::min(std::max(parallelism, 1), num_tasks);
  if (threads == 1) {
    for (int i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  if (const Runtime* rt = g_current.load(std::memory_order_acquire)) {
    RunOnTeam(*rt, num_tasks, threads, task);
    return;
  }
  ThreadPool::Default().ParallelFor(num_tasks, threads, task);
}

}  // namespace mempipe
