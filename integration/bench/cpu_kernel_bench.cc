// mempipe-cpu-kernel-bench: the host kernels of one decode step in isolation, timed in CPU time
// (so a machine shared with other work still gives the kernels' own rate): the relevancy scan
// and top-k of the cpu selector (steps 2-3), sparse and dense attention (step 4), and a plain
// read of the same bytes (membw.h) for the fraction. Each layer has its own cache and digests
// and the layers are visited in turn, so with enough of them every pass reads DRAM, not cache.
// Random data; the selection is random (sinks and locals kept), ascending. With the AVX-512
// kernels it also times their reads alone (ReadDecodeRows: the same rows, order, thread split
// and prefetch, no arithmetic), the rate the access pattern allows on this machine.
//
//   mempipe-cpu-kernel-bench                                   # Llama-3-8B layer, bf16, 32K
//   mempipe-cpu-kernel-bench --threads=1 --cpu_kernel=portable
//   mempipe-cpu-kernel-bench --num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32
//       --dtype=fp32 --context=6144 --budget=512 --layers=30    # SmolLM2-135M (one line)
//   ... --seqs=4 --kv_layout=head                              # as vLLM serves it: 4 x 6K
#include <sys/mman.h>

#include <algorithm>
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
#include "attention/decode.h"
#include "core/clock.h"
#include "core/cpu_kernel.h"
#include "integration/bench/membw.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

ABSL_FLAG(int, layers, 8, "Layers, each with its own cache and digests, visited in turn");
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
          "Host kernels (core/cpu_kernel.h): auto, portable, avx512, avx512-bf16");
ABSL_FLAG(std::string, kv_layout, "token",
          "KV cache layout: token (token-major, vLLM's FlashAttention layout) or head "
          "(head-major: each KV head's page contiguous, what the vLLM plugin uses on the CPU)");
ABSL_FLAG(bool, huge_pages, true, "Ask for transparent huge pages for caches and digests");

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

int Run() {
  const int layers = absl::GetFlag(FLAGS_layers), threads = absl::GetFlag(FLAGS_threads);
  auto dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  auto kernel = ParseCpuKernel(absl::GetFlag(FLAGS_cpu_kernel));
  absl::Status status = !dtype.ok() ? dtype.status() : kernel.status();
  if (status.ok()) status = SetCpuKernel(*kernel);
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
  if (status.ok() &&
      (layers < 1 || threads < 1 || seqs < 1 || absl::GetFlag(FLAGS_passes) < 1 || k < 2 ||
       k > pages || absl::GetFlag(FLAGS_num_heads) % cache.num_kv_heads != 0)) {
    status = absl::InvalidArgumentError(absl::StrCat(
        "need layers, threads, seqs, passes >= 1 (got ", layers, ", ", threads, ", ", seqs, ", ",
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

  // The kernels' reads alone (ReadDecodeRows), where the AVX-512 kernel runs.
  const bool rows = UseAvx512Kernel();
  double rel = 1e300, top = 1e300, sparse = 1e300, dense = 1e300, sparse_rows = 1e300,
         dense_rows = 1e300;
  for (int pass = 0; pass < absl::GetFlag(FLAGS_passes); ++pass) {
    std::fprintf(stderr, "[pass] %d/%d\n", pass + 1, absl::GetFlag(FLAGS_passes));
    double t_rel = 0, t_top = 0, t_sparse = 0, t_dense = 0, t_sparse_rows = 0, t_dense_rows = 0;
    for (int l = 0; l < layers; ++l) {
      digest.data = digest_mem[l].get();
      double t0 = ProcessCpuMs();
      status.Update(
          ComputeRelevancy(qv, cache, digest, tv, GroupAggregation::kMax, scores.data(), threads));
      const double t1 = ProcessCpuMs();
      status.Update(SelectPages(scores.data(), tv, bs, kv, config, sel, threads));
      t_rel += t1 - t0;
      t_top += ProcessCpuMs() - t1;
    }
    for (int l = 0; l < layers; ++l) {
      cache.data = kv_mem[l].get();
      const double t0 = ProcessCpuMs();
      status.Update(SparseDecode(io, cache, tv, page_list, scale));
      t_sparse += ProcessCpuMs() - t0;
    }
    for (int l = 0; l < layers; ++l) {
      cache.data = kv_mem[l].get();
      const double t0 = ProcessCpuMs();
      status.Update(DenseDecode(io, cache, tv, scale));
      t_dense += ProcessCpuMs() - t0;
    }
    for (int l = 0; rows && l < layers; ++l) {
      cache.data = kv_mem[l].get();
      const double t0 = ProcessCpuMs();
      status.Update(ReadDecodeRows(io, cache, tv, &page_list));
      t_sparse_rows += ProcessCpuMs() - t0;
    }
    for (int l = 0; rows && l < layers; ++l) {
      cache.data = kv_mem[l].get();
      const double t0 = ProcessCpuMs();
      status.Update(ReadDecodeRows(io, cache, tv, nullptr));
      t_dense_rows += ProcessCpuMs() - t0;
    }
    if (!status.ok()) {
      std::fprintf(stderr, "mempipe-cpu-kernel-bench: %s\n", std::string(status.message()).c_str());
      return 1;
    }
    // Per layer, CPU time per thread.
    rel = std::min(rel, t_rel / layers / threads);
    top = std::min(top, t_top / layers / threads);
    sparse = std::min(sparse, t_sparse / layers / threads);
    dense = std::min(dense, t_dense / layers / threads);
    sparse_rows = std::min(sparse_rows, t_sparse_rows / layers / threads);
    dense_rows = std::min(dense_rows, t_dense_rows / layers / threads);
  }
  auto bw = MeasureReadBandwidth(std::max<size_t>(size_t{256} << 20, cache.NumBytes()), threads, 5);
  if (!bw.ok()) {
    std::fprintf(stderr, "mempipe-cpu-kernel-bench: %s\n",
                 std::string(bw.status().message()).c_str());
    return 1;
  }
  const double machine = bw->gbytes_per_cpu_s;
  const double sparse_bytes = 2.0 * seqs * kv * k * bs * d * DTypeSize(dt);
  auto row = [&](const char* what, double bytes, double ms) {
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    std::printf("  %-34s %8.3f ms  %7.1f MiB  %6.1f GB/s  %4.0f%%\n", what, ms, bytes / 1048576.0,
                gbps, 100 * gbps / machine);
  };
  std::printf(
      "mempipe-cpu-kernel-bench: %d layers x (%d q / %d KV heads, head_dim %d, %s, page %d, "
      "%d x %d tokens, budget %d, %s-major cache), %d thread(s), %s kernels, huge pages %s\n",
      layers, heads, kv, d, std::string(DTypeName(dt)).c_str(), bs, seqs, context, k * bs,
      cache.HeadMajor() ? "head" : "token", threads, std::string(ActiveCpuKernelName()).c_str(),
      huge ? "asked for" : "not asked for");
  std::printf(
      "per layer, best of %d passes, CPU time per thread; %% of the read bandwidth "
      "(STREAM-like, %d thread(s), per-thread CPU time: %.1f GB/s):\n",
      absl::GetFlag(FLAGS_passes), threads, machine);
  row("relevancy scan (digests)", digest.NumBytes(), rel);
  std::printf("  %-34s %8.3f ms  (over the (sequence, KV head) rows)\n", "top-k (SelectPages)",
              top);
  row("sparse attention (selected K/V)", sparse_bytes, sparse);
  row("dense attention (all K/V)", cache.NumBytes(), dense);
  if (rows) {
    std::printf(
        "the same rows read in the kernels' order, thread split and prefetch, no arithmetic "
        "(ReadDecodeRows): the rate their access pattern allows\n");
    row("sparse attention's reads", sparse_bytes, sparse_rows);
    row("dense attention's reads", cache.NumBytes(), dense_rows);
    std::printf("  sparse kernel / its reads: %.0f%%; dense kernel / its reads: %.0f%%\n",
                100 * sparse_rows / sparse, 100 * dense_rows / dense);
  }
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
