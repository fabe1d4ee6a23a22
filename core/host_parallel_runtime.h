// mempipe core: the process-wide parallel-for, on mempipe's pool or on a host OpenMP team.
//
// By default HostParallelFor runs its tasks on ThreadPool::Default() (core/thread_pool.h). A
// process that already runs an OpenMP runtime (torch's ATen inside vLLM's CPU worker) can
// install that runtime instead: the tasks then run on the runtime's own thread team, the one
// its `#pragma omp parallel` regions use, so the team's threads (which spin on the cores between
// the runtime's parallel regions) pick the work up instead of competing with mempipe's threads
// for a time slice. Nothing here links an OpenMP library: the runtime is reached through three
// entry points of the GNU libgomp ABI (which LLVM's libomp also exports), taken from a library
// already loaded in the process.
//
//   // In a process where torch has loaded its libgomp.so.1:
//   RETURN_IF_ERROR(InstallLoadedOpenMpRuntime("/venv/.../torch/lib/libgomp.so.1"));
//   HostParallelFor(num_tasks, /*parallelism=*/2, [&](int task) { ... });  // on torch's team
//   ResetHostParallelRuntime();  // back to mempipe's pool
//
// Semantics on a runtime: a call runs on k = min(parallelism, num_tasks) threads of a team. It
// asks GOMP_parallel for the largest k any call on this runtime has asked for, so that calls of
// different sizes reuse one team (libgomp forms its team again whenever the size asked for
// changes: about 40 us a call on the H100 machine's 16-vCPU Xeon); team threads past k run none
// of its tasks. Team thread t < k first runs tasks t, t + k, t + 2k, ... (as `#pragma omp parallel
// for schedule(static, 1)` would), then any task no other thread has started (a team thread the
// OS has not scheduled yet does not hold its share back); any task the team did not run (a
// runtime that reported a team it did not start) runs on the caller afterwards, so every task
// runs exactly once whatever the runtime does. Which thread runs a task never changes what the
// task computes.
//
// Nested and concurrent callers: a call made from inside an OpenMP team (a nested region, with
// nesting off, as the runtimes default to) gets a team of one and runs its tasks serially on
// that thread; calls from several threads outside any team each get their own team (libgomp
// keeps a thread pool per calling thread), so they stay correct but may use more threads than
// cores. Tasks must not throw across the runtime: an exception from a task is caught on the team
// thread and rethrown on the caller once the region has ended (the first one, if several throw),
// as ThreadPool::ParallelFor does.
//
// Install and reset are thread-safe and may race with running calls: a call uses the runtime
// that was installed when it started (installed runtimes are never unloaded or freed).
#ifndef MEMPIPE_CORE_HOST_PARALLEL_RUNTIME_H_
#define MEMPIPE_CORE_HOST_PARALLEL_RUNTIME_H_

#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"

namespace mempipe {

// The entry points `#pragma omp parallel` compiles to (GCC's libgomp ABI).
struct OpenMpEntryPoints {
  // GOMP_parallel(fn, data, num_threads, flags): runs fn(data) on every thread of a new team of
  // num_threads threads (0: the runtime's default), the caller as thread 0; returns after all.
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;   // omp_get_thread_num: this thread's index in its team
  int (*num_threads)() = nullptr;  // omp_get_num_threads: the size of this thread's team
};

// Runs HostParallelFor on `entry`'s teams from now on; `name` (non-empty) says which runtime it
// is in GetHostParallelRuntimeInfo(). InvalidArgument naming the null entry point or the empty
// name. Replaces any runtime installed before.
[[nodiscard]] absl::Status InstallHostParallelRuntime(const OpenMpEntryPoints& entry,
                                                      const std::string& name);

// Installs the OpenMP runtime `library_path` (e.g. torch's torch/lib/libgomp.so.1) that is
// already loaded in this process: dlopen(RTLD_NOLOAD), so a second copy of a runtime is never
// loaded, and the three symbols GOMP_parallel, omp_get_thread_num, omp_get_num_threads.
// InvalidArgument for an empty path; NotFound naming the path when it is not loaded (with the
// loader's message) or when a symbol is missing (naming the symbol). The library stays loaded
// for the life of the process.
[[nodiscard]] absl::Status InstallLoadedOpenMpRuntime(const std::string& library_path);

// Back to mempipe's pool (ThreadPool::Default()). Nothing happens if no runtime is installed.
void ResetHostParallelRuntime();

// What HostParallelFor runs on, and what its runtime calls did (a test and diagnostic hook).
struct HostParallelRuntimeInfo {
  bool installed = false;
  std::string name;           // the installed runtime's name ("" when none)
  int64_t team_calls = 0;     // HostParallelFor calls run through an installed runtime, ever
  int last_call_threads = 0;  // distinct team threads that ran a task in the latest such call
  int max_call_threads = 0;   // the most distinct team threads seen in one such call
  int last_call_team = 0;     // the team size the runtime reported in the latest such call
};
HostParallelRuntimeInfo GetHostParallelRuntimeInfo();

// The process-wide parallel-for: runs task(i) for every i in [0, num_tasks) on up to
// `parallelism` threads, the caller's included (the installed runtime's team, else
// ThreadPool::Default()); returns when all have run. num_tasks <= 0 does nothing; parallelism
// < 1 means 1; one thread (or one task) runs inline on the caller. An exception from a task is
// rethrown on the caller after every task has run.
void HostParallelFor(int num_tasks, int parallelism, absl::FunctionRef<void(int)> task);

}  // namespace mempipe

#endif  // MEMPIPE_CORE_HOST_PARALLEL_RUNTIME_H_
