// mempipe-cpu-kernel-bench: the host kernels of one decode step in isolation: the relevancy scan
// and top-k of the cpu selector (steps 2-3), sparse and dense attention (step 4), and a plain
// read (membw.h, ReadProbe), repeated just before and after each kernel's layers in every pass,
// for the fraction (so a machine whose bandwidth drifts compares like moments). Two tables: CPU
// time per thread (so a machine shared with other work still gives the kernels' own rate), then
// wall clock (what a decode step waits for, idle threads and wake-ups included; meaningful on a
// quiet machine), each against the read measured on the same clock. Each layer has its own cache
// and digests and the layers are visited in turn; by default there are enough layers that together
// they are at least four times the last-level cache, and the read is as large (MemoryReadBytes), so
// both the kernels and the read come from DRAM, not cache. Random data; the selection is random
// (sinks and locals kept), ascending. With the AVX-512 or AVX2 kernels it also times their reads
// alone (ReadDecodeRows: the same rows, order, thread split and prefetch, no arithmetic), the rate
// the access pattern allows on this machine. Where a kernel's reads fit in half the last-level
// cache, it times that kernel on one layer over and over (from cache: the ceiling its arithmetic
// sets); and it sets the kernels' multiply-adds beside the cores' measured FMA rate
// (MeasureFmaRate). Steps 2 and 3 are timed apart, then together as ScoreAndSelect runs them (one
// parallel call, each row selected where its scan ends), and the whole sparse layer as the cpu
// placement runs it (HostSparseLayer: each row attended where it is selected, one call). Last, a
// parallel call whose threads only meet: the host threads' own cost per call, the floor under each
// kernel.
// Each kernel's layers start after an untimed such call, so that its first layer finds the threads
// awake after the read, as a decode step's layers do.
//
//   mempipe-cpu-kernel-bench                                   # Llama-3-8B layer, bf16, 32K
//   mempipe-cpu-kernel-bench --threads=1 --cpu_kernel=portable
//   mempipe-cpu-kernel-bench --num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32
//       --dtype=fp32 --context=6144 --budget=512               # SmolLM2-135M (one line)
//   ... --seqs=4 --kv_layout=head                              # as vLLM serves it: 4 x 6K
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "attention/decode.h"
#include "backend/host_sparse_layer.h"
#include "core/clock.h"
#include "core/cpu_kernel.h"
#include "core/host_parallel_runtime.h"
#include "core/parallel.h"
#include "core/thread_pool.h"
#include "integration/bench/membw.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

ABSL_FLAG(int, layers, 0,
          "Layers, each with its own cache and digests, visited in turn (0: enough that their "
          "caches total at least 4x the last-level cache, at least 2)");
ABSL_FLAG(int, read_mib, 0,
          "Buffer of the STREAM-like read in MiB (0: MemoryReadBytes, at least 4x the "
          "last-level cache, 256 MiB and one layer's cache)");
ABSL_FLAG(int, num_heads, 32, "Query heads");
ABSL_FLAG(int, num_kv_heads, 8, "KV heads");
ABSL_FLAG(int, head_dim, 128, "Head dimension: 64, 128 or 256");
ABSL_FLAG(std::string, dtype, "bf16", "Cache, digest and query dtype: fp32, fp16 or bf16");
ABSL_FLAG(int, page_size, 16, "Tokens per page");
ABSL_FLAG(int, context, 32768, "Tokens of each sequence");
ABSL_FLAG(int, seqs, 1,
          "Sequences decoded together (one step of a batch), each of --context tokens");
ABSL_FLAG(int, budget, 4096, "Tokens selected per KV head (sparse attention reads these)");
ABSL_FLAG(int, threads, 1, "Host threads for every kernel");
ABSL_FLAG(int, passes, 3, "Passes over the layers; the best is reported");
ABSL_FLAG(std::string, cpu_kernel, "auto",
          "Host kernels (core/cpu_kernel.h): auto, portable, avx512, avx512-bf16, avx2");
ABSL_FLAG(std::string, read_ahead, "",
          "Dense and sparse decode's prefetch in the AVX-512 kernel (attention/decode.h "
          "DecodeReadAhead): stream, next_page; empty keeps MEMPIPE_READ_AHEAD's (default stream)");
ABSL_FLAG(std::string, sparse_read_ahead, "",
          "The earlier name of --read_ahead (then sparse decode's only), kept so that the "
          "commands under results/read_ahead/ still run; --read_ahead wins where both are set");
ABSL_FLAG(std::string, kv_layout, "token",
          "KV cache layout: token (token-major, vLLM's FlashAttention layout), head (head-major: "
          "each KV head's page contiguous, what the vLLM plugin uses on the CPU), page "
          "(page-major: a KV head's K page and V page one contiguous piece), head_kt or page_kt "
          "(head- or page-major with each K page transposed, [head_dim / x, page, x] with x "
          "channels of 4 bytes: the AVX-512 kernel scores 16 tokens per vector)");
ABSL_FLAG(bool, huge_pages, true, "Ask for transparent huge pages for caches and digests");
ABSL_FLAG(std::string, host_threads, "pool",
          "What the kernels' threads are: pool (mempipe's own, core/thread_pool.h) or openmp (the "
          "system's libgomp.so.1 team, loaded and installed as the vLLM backend installs torch's; "
          "core/host_parallel_runtime.h)");

namespace mempipe {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

Buffer Allocate(size_t bytes, bool huge) {
  constexpr size_t kAlign = size_t{2} << 20;
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  Buffer b(static_cast<uint8_t*>(std::aligned_alloc(kAlign, rounded)));
  if (b && huge) madvise(b.get(), rounded, MADV_HUGEPAGE);  // advisory
  return b;
}

// --host_threads: mempipe's pool (the default), or the system's libgomp team.
absl::Status UseHostThreads(const std::string& name) {
  if (name == "pool") return absl::OkStatus();
  if (name != "openmp") {
    return absl::InvalidArgumentError(
        absl::StrCat("--host_threads must be pool or openmp, got \"", name, "\""));
  }
  // Loaded for the life of the process, as torch's copy is inside vLLM.
  if (dlopen("libgomp.so.1", RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    return absl::NotFoundError(absl::StrCat("--host_threads=openmp: ", dlerror()));
  }
  return InstallLoadedOpenMpRuntime("libgomp.so.1");
}

// One parallel call of `threads` ranges (ForEachItemRange) in which each range waits until every
// range has started, or 1 ms has passed (a runtime that gave fewer threads runs ranges in turn):
// with no other work, the call's time is the runtime's dispatch and join with every thread taking
// part. A call whose tasks were all done before the helpers looked would time the caller alone.
void AllThreadsMeet(int threads) {
  std::atomic<int> arrived{0};
  const int ranges = std::min(threads, ThreadPool::DefaultMaxWorkers() + 1);
  ForEachItemRange(threads, threads, [&](int64_t, int64_t) {
    arrived.fetch_add(1, std::memory_order_acq_rel);
    const Clock::time_point t0 = Clock::now();
    while (arrived.load(std::memory_order_acquire) < ranges && MsSince(t0) < 1.0) {
    }
  });
}

int Run() {
  const int threads = absl::GetFlag(FLAGS_threads);
  int layers = absl::GetFlag(FLAGS_layers);
  auto dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  auto kernel = ParseCpuKernel(absl::GetFlag(FLAGS_cpu_kernel));
  absl::Status status = !dtype.ok() ? dtype.status() : kernel.status();
  if (status.ok()) status = SetCpuKernel(*kernel);
  if (status.ok()) status = UseHostThreads(absl::GetFlag(FLAGS_host_threads));
  std::string ra = absl::GetFlag(FLAGS_read_ahead);
  if (ra.empty()) ra = absl::GetFlag(FLAGS_sparse_read_ahead);
  if (status.ok() && !ra.empty()) {
    absl::StatusOr<DecodeReadAhead> mode = ParseDecodeReadAhead(ra);
    if (mode.ok()) SetDecodeReadAhead(*mode);
    status = mode.status();
  }
  const int bs = absl::GetFlag(FLAGS_page_size), context = absl::GetFlag(FLAGS_context);
  const int pages = NumPages(context, bs), k = absl::GetFlag(FLAGS_budget) / bs;
  const int seqs = absl::GetFlag(FLAGS_seqs);
  KvCacheView cache{nullptr, status.ok() ? *dtype : DType::kFloat32, std::max(seqs, 1) * pages,
                    bs,      absl::GetFlag(FLAGS_num_kv_heads),      absl::GetFlag(FLAGS_head_dim)};
  auto layout = ParseKvLayout(absl::GetFlag(FLAGS_kv_layout));
  if (status.ok()) status = layout.status();
  if (layout.ok()) cache.layout = *layout;
  int placeholder = 0;  // the shape check wants a pointer; each layer's comes later
  cache.data = &placeholder;
  if (status.ok()) status = ValidateKvCache(cache);
  if (status.ok() && (layers < 0 || absl::GetFlag(FLAGS_read_mib) < 0 || threads < 1 || seqs < 1 ||
                      absl::GetFlag(FLAGS_passes) < 1 || k < 2 || k > pages ||
                      absl::GetFlag(FLAGS_num_heads) % cache.num_kv_heads != 0)) {
    status = absl::InvalidArgumentError(absl::StrCat(
        "need layers, read_mib >= 0 (got ", layers, ", ", absl::GetFlag(FLAGS_read_mib),
        "), threads, seqs, passes >= 1 (got ", threads, ", ", seqs, ", ",
        absl::GetFlag(FLAGS_passes), "), 2 <= budget / page_size <= pages (got ", k, " of ", pages,
        ") and num_heads a multiple of num_kv_heads (got ", absl::GetFlag(FLAGS_num_heads), " and ",
        cache.num_kv_heads, ")"));
  }
  if (!status.ok()) {
    std::fprintf(stderr, "mempipe-cpu-kernel-bench: %s\n", std::string(status.message()).c_str());
    return 2;
  }
  const DType dt = cache.dtype;
  const int kv = cache.num_kv_heads, d = cache.head_dim, heads = absl::GetFlag(FLAGS_num_heads);
  DigestView digest{nullptr, dt, cache.num_blocks, kv, d};
  const bool huge = absl::GetFlag(FLAGS_huge_pages);
  const size_t llc = LastLevelCacheBytes();
  const size_t layer_bytes = cache.NumBytes() + digest.NumBytes();
  if (layers == 0) {
    layers = static_cast<int>(std::max<size_t>(2, (4 * llc + layer_bytes - 1) / layer_bytes));
  }
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Buffer> kv_mem, digest_mem;
  for (int l = 0; l < layers; ++l) {
    std::fprintf(stderr, "\r[fill] layer %d/%d", l + 1, layers);
    kv_mem.push_back(Allocate(cache.NumBytes(), huge));
    digest_mem.push_back(Allocate(digest.NumBytes(), huge));
    if (!kv_mem.back() || !digest_mem.back()) {
      std::fprintf(stderr, "\nmempipe-cpu-kernel-bench: out of memory; lower --layers\n");
      return 2;
    }
    for (size_t i = 0; i < cache.NumElems(); ++i) {
      StoreFromFloat(kv_mem.back().get(), dt, i, static_cast<float>(i % 13) * 0.1f - 0.6f);
    }
    for (size_t i = 0; i < digest.NumElems(); ++i) {
      StoreFromFloat(digest_mem.back().get(), dt, i, normal(rng));
    }
  }
  std::fprintf(stderr, "\n");
  // Sequence s owns blocks [s * pages, (s + 1) * pages).
  std::vector<int32_t> table(static_cast<size_t>(seqs) * pages);
  std::iota(table.begin(), table.end(), 0);
  const std::vector<int32_t> lens(seqs, context);
  const BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint8_t> q(static_cast<size_t>(seqs) * heads * d * 4), out(q.size());
  for (int i = 0; i < seqs * heads * d; ++i) StoreFromFloat(q.data(), dt, i, normal(rng));
  // Random middle pages per (sequence, KV head), with the first and the last page.
  std::vector<int32_t> selected(static_cast<size_t>(seqs) * kv * k), counts(seqs * kv, k);
  for (int h = 0; h < seqs * kv; ++h) {
    std::vector<int32_t> middle(pages - 2);
    std::iota(middle.begin(), middle.end(), 1);
    std::shuffle(middle.begin(), middle.end(), rng);
    middle.resize(k - 2);
    middle.push_back(0);
    middle.push_back(pages - 1);
    std::sort(middle.begin(), middle.end());
    std::copy(middle.begin(), middle.end(), &selected[static_cast<size_t>(h) * k]);
  }
  const PageList page_list{selected.data(), counts.data(), kv, k};
  std::vector<float> scores(static_cast<size_t>(seqs) * kv * pages);
  std::vector<int32_t> sel_pages(static_cast<size_t>(seqs) * kv * k), sel_counts(seqs * kv);
  SelectionConfig config;
  config.budget_tokens = k * bs;
  const SelectionView sel{sel_pages.data(), sel_counts.data(), seqs, kv, k};
  const DecodeIo io{q.data(), out.data(), dt, seqs, heads, d, threads};
  const QueryView qv{q.data(), dt, seqs, heads, d};
  const float scale = 0.125f;

  // The kernels' reads alone (ReadDecodeRows), where the AVX-512 or AVX2 kernel runs.
  const bool rows = UseAvx512Kernel() || UseAvx2Kernel();
  // The read that each kernel is compared with, repeated between the kernels in every pass:
  // read, the kernel's layers, read. A kernel's fraction in a pass is its rate over the mean of
  // the two reads around it, so on a machine whose bandwidth drifts (other tenants of a VM's
  // host) a kernel is compared with the bandwidth of its own moment, not of another.
  const size_t read_bytes = absl::GetFlag(FLAGS_read_mib) > 0
                                ? static_cast<size_t>(absl::GetFlag(FLAGS_read_mib)) << 20
                                : MemoryReadBytes(cache.NumBytes());
  absl::StatusOr<ReadProbe> probe = ReadProbe::Create(read_bytes, threads);
  if (!probe.ok()) {
    std::fprintf(stderr, "mempipe-cpu-kernel-bench: %s\n",
                 std::string(probe.status().message()).c_str());
    return 1;
  }
  // Per kernel, the best pass's time per layer: CPU time per thread, and wall-clock time.
  enum Kernel {
    kRel,
    kTop,
    kSel,
    kLayer,
    kSparse,
    kDense,
    kSparseRows,
    kDenseRows,
    kSparseHot,
    kDenseHot,
    kEmpty,
    kKernels
  };
  // From cache: layer 0's kernel `layers` times in a row after an untimed call, so that what it
  // reads stays in the caches: its rate with DRAM out of the way, the ceiling its arithmetic
  // sets. Only where what it reads fits in half the last-level cache.
  const double sparse_bytes = 2.0 * seqs * kv * k * bs * d * DTypeSize(dt);
  const bool hot_sparse = llc > 0 && sparse_bytes <= llc / 2;
  // The sparse layer's bytes: the digests the scan reads and the K/V the attention reads.
  const double layer_sparse_bytes = sparse_bytes + static_cast<double>(digest.NumBytes());
  const bool fused_layer = HostSparseLayerFused(config, bs);
  const bool hot_dense = llc > 0 && cache.NumBytes() <= llc / 2;
  double cpu[kKernels], wall[kKernels];
  std::fill(cpu, cpu + kKernels, 1e300);
  std::fill(wall, wall + kKernels, 1e300);
  // Per kernel and pass: its time per layer over the mean time of the two reads around it (CPU
  // time per thread, wall); and every read's rate in GB/s.
  std::vector<double> rel_cpu[kKernels], rel_wall[kKernels];
  std::vector<double> read_cpu_gbps, read_wall_gbps;
  for (int pass = 0; pass < absl::GetFlag(FLAGS_passes); ++pass) {
    std::fprintf(stderr, "[pass] %d/%d\n", pass + 1, absl::GetFlag(FLAGS_passes));
    double t_cpu[kKernels] = {}, t_wall[kKernels] = {};
    // Runs f() and adds its CPU and wall time to kernel k's.
    auto timed = [&](Kernel k, auto f) {
      const ThreadsCpu c0 = ThreadsCpu::Now();
      const Clock::time_point w0 = Clock::now();
      f();
      t_wall[k] += MsSince(w0);
      t_cpu[k] += ThreadsCpu::Now().MsSince(c0);
    };
    // The read's own threads ran last, long enough for the kernels' threads to stop spinning and
    // sleep. A decode step's layers find them awake (torch's operators between the layers run on
    // the same team inside vLLM), so each kernel's layers start after an untimed call in which
    // every thread meets: its first layer pays no wake-ups that later layers do not.
    auto wake = [&] { AllThreadsMeet(threads); };
    ReadProbe::Pass before = probe->Run();
    // Reads again after the layers of kernels `ks`, and keeps each one's time per layer over
    // the reads' mean time.
    auto bracket = [&](std::initializer_list<Kernel> ks) {
      const ReadProbe::Pass after = probe->Run();
      for (const ReadProbe::Pass& r : {before, after}) {
        read_cpu_gbps.push_back(probe->GBytesPerCpuS(r));
        read_wall_gbps.push_back(probe->GBytesPerS(r));
      }
      const double read_cpu_ms = 0.5e3 * (before.cpu_s + after.cpu_s);
      const double read_wall_ms = 0.5e3 * (before.wall_s + after.wall_s);
      for (const Kernel k : ks) {
        rel_cpu[k].push_back(t_cpu[k] / layers / threads / read_cpu_ms);
        rel_wall[k].push_back(t_wall[k] / layers / read_wall_ms);
      }
      before = after;
    };
    wake();
    for (int l = 0; l < layers; ++l) {
      digest.data = digest_mem[l].get();
      timed(kRel, [&] {
        status.Update(ComputeRelevancy(qv, cache, digest, tv, GroupAggregation::kMax, scores.data(),
                                       threads));
      });
      timed(kTop,
            [&] { status.Update(SelectPages(scores.data(), tv, bs, kv, config, sel, threads)); });
    }
    bracket({kRel, kTop});
    // Both steps as the cpu selector runs them: each row selected where its scan ends, in one
    // parallel call (ComputeRelevancyThen). Its own pass over the layers: every layer's
    // digests come from DRAM, as the scan's above.
    wake();
    for (int l = 0; l < layers; ++l) {
      digest.data = digest_mem[l].get();
      timed(kSel,
            [&] { status.Update(ScoreAndSelect(qv, cache, digest, tv, config, sel, threads)); });
    }
    bracket({kSel});
    // The whole sparse layer (scan, top-k, attention over the selection) as the cpu placement
    // runs it: one parallel call where the budget fits one decode chunk (HostSparseLayer).
    wake();
    for (int l = 0; l < layers; ++l) {
      digest.data = digest_mem[l].get();
      cache.data = kv_mem[l].get();
      timed(kLayer,
            [&] { status.Update(HostSparseLayer(io, cache, digest, tv, config, sel, scale)); });
    }
    bracket({kLayer});
    wake();
    for (int l = 0; l < layers; ++l) {
      cache.data = kv_mem[l].get();
      timed(kSparse, [&] { status.Update(SparseDecode(io, cache, tv, page_list, scale)); });
    }
    bracket({kSparse});
    wake();
    for (int l = 0; l < layers; ++l) {
      cache.data = kv_mem[l].get();
      timed(kDense, [&] { status.Update(DenseDecode(io, cache, tv, scale)); });
    }
    bracket({kDense});
    if (rows) {
      wake();
      for (int l = 0; l < layers; ++l) {
        cache.data = kv_mem[l].get();
        timed(kSparseRows, [&] { status.Update(ReadDecodeRows(io, cache, tv, &page_list)); });
      }
      bracket({kSparseRows});
      wake();
      for (int l = 0; l < layers; ++l) {
        cache.data = kv_mem[l].get();
        timed(kDenseRows, [&] { status.Update(ReadDecodeRows(io, cache, tv, nullptr)); });
      }
      bracket({kDenseRows});
    }
    auto from_cache = [&](Kernel k, auto f) {
      cache.data = kv_mem[0].get();
      f();
      for (int l = 0; l < layers; ++l) timed(k, f);
      bracket({k});
    };
    if (hot_sparse) {
      from_cache(kSparseHot, [&] { status.Update(SparseDecode(io, cache, tv, page_list, scale)); });
    }
    if (hot_dense) {
      from_cache(kDenseHot, [&] { status.Update(DenseDecode(io, cache, tv, scale)); });
    }
    // A parallel call whose threads only meet: what the host threads' runtime costs a call
    // that every thread takes part in (dispatch, join), the floor under every kernel call.
    wake();
    for (int l = 0; l < layers; ++l) timed(kEmpty, [&] { AllThreadsMeet(threads); });
    bracket({kEmpty});
    if (!status.ok()) {
      std::fprintf(stderr, "mempipe-cpu-kernel-bench: %s\n", std::string(status.message()).c_str());
      return 1;
    }
    // Per layer; CPU time per thread.
    for (int k = 0; k < kKernels; ++k) {
      cpu[k] = std::min(cpu[k], t_cpu[k] / layers / threads);
      wall[k] = std::min(wall[k], t_wall[k] / layers);
    }
  }
  const bool on_team = GetHostParallelRuntimeInfo().installed;
  const absl::Duration spin = ThreadPool::Default().spin();
  const std::string host =
      on_team ? "libgomp's team"
              : absl::StrCat("mempipe's pool (spin ", absl::FormatDuration(spin), ")");
  std::printf(
      "mempipe-cpu-kernel-bench: %d layers x (%d q / %d KV heads, head_dim %d, %s, page %d, "
      "%d x %d tokens, budget %d, %s-major cache), %d thread(s) on %s, %s kernels (read-ahead: "
      "%s), huge pages %s\n",
      layers, heads, kv, d, std::string(DTypeName(dt)).c_str(), bs, seqs, context, k * bs,
      KvLayoutName(cache.layout), threads, host.c_str(), std::string(ActiveCpuKernelName()).c_str(),
      std::string(DecodeReadAheadName(ActiveDecodeReadAhead())).c_str(),
      huge ? "asked for" : "not asked for");
  const double mib = 1048576.0;
  std::printf("  CPU: %s\n", CpuDescription().c_str());
  std::printf(
      "  last-level cache %s; the layers' caches and digests total %.0f MiB; the read %.0f MiB\n",
      llc ? absl::StrCat(llc >> 20, " MiB").c_str() : "unknown", layers * layer_bytes / mib,
      probe->bytes() / mib);
  if (llc > 0 &&
      (static_cast<double>(layers) * layer_bytes < 4.0 * llc || probe->bytes() < 4 * llc)) {
    std::printf(
        "  WARNING: under 4x the last-level cache: part of these reads may come from cache, not "
        "DRAM, and the percentages below compare unlike things (raise --layers / --read_mib, or "
        "leave them at 0)\n");
  }
  // One table per clock: CPU time per thread (the kernels' own rate, even on a shared machine,
  // when the threads sleep rather than spin)
  // and wall clock (what a decode step waits for: idle threads and wake-ups count too), each
  // against the reads around the kernel on the same clock.
  for (const bool on_wall : {false, true}) {
    const double* ms = on_wall ? wall : cpu;
    const std::vector<double>* rel = on_wall ? rel_wall : rel_cpu;
    const Spread read = SpreadOf(on_wall ? read_wall_gbps : read_cpu_gbps);
    // The best pass's time and rate; then the kernel's rate over the reads' around it in each
    // pass: the median and the range over the passes.
    auto row = [&](const char* what, double bytes, Kernel k) {
      const double gbps = bytes / (ms[k] * 1e-3) / 1e9;
      std::vector<double> pct;
      for (const double r : rel[k]) pct.push_back(100 * bytes / probe->bytes() / r);
      const Spread p = SpreadOf(pct);
      std::printf("  %-34s %8.3f ms  %7.1f MiB  %6.1f GB/s  %4.0f%% (%.0f-%.0f)\n", what, ms[k],
                  bytes / 1048576.0, gbps, p.median, p.min, p.max);
    };
    if (!on_wall && on_team) {
      std::printf(
          "(libgomp's threads spin between calls, and their clocks count the spin: this table "
          "overstates the kernels' CPU time; read the wall-clock one)\n");
    } else if (!on_wall && threads > 1 && spin > absl::ZeroDuration()) {
      std::printf(
          "(mempipe's pool spins up to %s after each call (MEMPIPE_POOL_SPIN_US), and the "
          "threads' clocks count the spin of those left idle: read the wall-clock table, or set "
          "MEMPIPE_POOL_SPIN_US=0 for the kernels' own rate on a shared machine)\n",
          absl::FormatDuration(spin).c_str());
    }
    std::printf(
        "per layer, best of %d passes, %s; then %% of the STREAM-like read (%d thread(s)) taken "
        "just before and after the kernel's layers, median (range) over the passes; the reads: "
        "median %.1f GB/s (%.1f-%.1f), %s:\n",
        absl::GetFlag(FLAGS_passes), on_wall ? "wall clock" : "CPU time per thread", threads,
        read.median, read.min, read.max, on_wall ? "wall clock" : "per-thread CPU time");
    row(on_wall ? "relevancy scan (digests), wall" : "relevancy scan (digests)", digest.NumBytes(),
        kRel);
    std::printf("  %-34s %8.3f ms  (over the (sequence, KV head) rows)\n",
                on_wall ? "top-k (SelectPages), wall" : "top-k (SelectPages)", ms[kTop]);
    row(on_wall ? "scan + top-k, one call, wall" : "scan + top-k, one call", digest.NumBytes(),
        kSel);
    row(on_wall ? "sparse attention, wall" : "sparse attention (selected K/V)", sparse_bytes,
        kSparse);
    row(on_wall ? "sparse layer, one call, wall" : "sparse layer, one call", layer_sparse_bytes,
        kLayer);
    std::printf("  %-34s %8.3f ms  (the sum of the best passes: scan + top-k + attention%s)\n",
                on_wall ? "sparse layer apart, wall" : "sparse layer apart",
                ms[kRel] + ms[kTop] + ms[kSparse],
                fused_layer ? "" : "; the layer above also ran them apart: budget over one chunk");
    row(on_wall ? "dense attention, wall" : "dense attention (all K/V)", cache.NumBytes(), kDense);
    if (rows) {
      if (!on_wall) {
        std::printf(
            "the same rows read in the kernels' order, thread split and prefetch, no arithmetic "
            "(ReadDecodeRows): the rate their access pattern allows\n");
      }
      row(on_wall ? "sparse attention's reads, wall" : "sparse attention's reads", sparse_bytes,
          kSparseRows);
      row(on_wall ? "dense attention's reads, wall" : "dense attention's reads", cache.NumBytes(),
          kDenseRows);
      std::printf("  sparse kernel / its reads: %.0f%%; dense kernel / its reads: %.0f%%%s\n",
                  100 * ms[kSparseRows] / ms[kSparse], 100 * ms[kDenseRows] / ms[kDense],
                  on_wall ? " (wall)" : "");
    }
    if (!on_wall && (hot_sparse || hot_dense)) {
      std::printf(
          "layer 0's kernel again and again, its rows in the caches: the rate its arithmetic "
          "allows with DRAM out of the way (%% of the same DRAM read)\n");
    }
    if (hot_sparse) {
      row(on_wall ? "sparse attention from cache, wall" : "sparse attention, from cache",
          sparse_bytes, kSparseHot);
    }
    if (hot_dense) {
      row(on_wall ? "dense attention from cache, wall" : "dense attention, from cache",
          cache.NumBytes(), kDenseHot);
    }
    if (on_wall) {
      // At the reads' median rate, sparse attention's bytes plus one such call: the most of the
      // read a sparse call can reach on this runtime, however fast its own work.
      const double bytes_ms = sparse_bytes / (read.median * 1e9) * 1e3;
      std::printf(
          "  %-34s %8.4f ms  (%d thread(s) that only meet: the runtime's floor per call; sparse "
          "attention's bytes at the reads' median plus it: %.0f%% of the read at most)\n",
          "empty parallel call, wall", ms[kEmpty], threads,
          100 * bytes_ms / (bytes_ms + ms[kEmpty]));
    }
  }
  // The arithmetic beside the bytes: q.k and p.v are one fp32 multiply-add per query head, token
  // and channel each; against the rate the cores' FMA units reach (MeasureFmaRate, ~0.1 s).
  const double sparse_macs = 2.0 * seqs * heads * k * bs * d;
  const double dense_macs = 2.0 * seqs * heads * static_cast<double>(context) * d;
  std::printf(
      "arithmetic (q.k and p.v, multiply-adds): sparse %.2f M, dense %.1f M per layer, %.2f per "
      "byte read\n",
      sparse_macs / 1e6, dense_macs / 1e6, sparse_macs / sparse_bytes);
  absl::StatusOr<FmaRate> fma = MeasureFmaRate(threads, int64_t{20} << 20);
  if (!fma.ok()) {
    std::printf("  the cores' FMA rate: not measured (%s)\n",
                std::string(fma.status().message()).c_str());
    return 0;
  }
  const Spread read = SpreadOf(read_cpu_gbps);
  const double peak = fma->gmacs_per_s * 1e9;
  // At the FMA rate, a layer's arithmetic as a fraction of its bytes' time at the reads' median.
  auto floor_pct = [&](double macs, double bytes) {
    return 100 * (macs / peak) / (bytes / (read.median * 1e9));
  };
  std::printf(
      "  the cores' fp32 FMA rate, %d thread(s), AVX-512 (measured): %.0f G/s; at that rate a "
      "layer's arithmetic takes %.0f%% (sparse) and %.0f%% (dense) of its bytes' time at the "
      "reads' median (CPU time)\n",
      threads, fma->gmacs_per_s, floor_pct(sparse_macs, sparse_bytes),
      floor_pct(dense_macs, cache.NumBytes()));
  // The kernels' multiply-adds per second of CPU time over the FMA rate.
  auto of_peak = [&](double macs, Kernel k) { return 100 * macs / (cpu[k] * 1e-3) / peak; };
  std::printf(
      "  the kernels' multiply-adds per second (CPU time) as %% of that rate: sparse %.0f%%, "
      "dense %.0f%%",
      of_peak(sparse_macs, kSparse), of_peak(dense_macs, kDense));
  if (hot_sparse) std::printf("; from cache: sparse %.0f%%", of_peak(sparse_macs, kSparseHot));
  if (hot_dense) std::printf(", dense %.0f%%", of_peak(dense_macs, kDenseHot));
  std::printf("\n");
  return 0;
}

}  // namespace
}  // namespace mempipe

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "The host decode kernels of one layer in CPU time (see the top of cpu_kernel_bench.cc)");
  absl::ParseCommandLine(argc, argv);
  return mempipe::Run();
}
