// mempipe-gpu-append-bench: bulk KV append fused with the digest update on the GPU (a long
// prompt's prefill appended in one batch), the linear launcher against the pre-fix quadratic
// kernel (legacy_append_gpu.h). Each run's digests are checked against BuildDigestsGpu over
// the same cache, bit for bit.
//
//   mempipe-gpu-append-bench --tokens=131072,1048576 --legacy_max_tokens=131072
//
// Shape: one sequence, its pages in a shuffled block order, Llama-3-8B's attention layer
// (8 KV heads, head_dim 128) in bf16 unless overridden. Times: median of --reps runs, each
// from a host-synchronized start to a host-synchronized end (includes launch overhead).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"
#include "core/status_macros.h"
#include "integration/bench/legacy_append_gpu.h"
#include "retriever/digest.h"
#include "retriever/gpu/digest_gpu.h"

ABSL_FLAG(std::string, tokens, "131072,1048576", "comma-separated prompt lengths to append");
ABSL_FLAG(int, legacy_max_tokens, 1048576,
          "also time the pre-fix quadratic kernel up to this many tokens (0: never)");
ABSL_FLAG(double, legacy_budget_s, 30,
          "skip the quadratic kernel where its time, extrapolated quadratically from its last "
          "measured length, would exceed this many seconds");
ABSL_FLAG(int, kv_heads, 8, "KV heads");
ABSL_FLAG(int, head_dim, 128, "head_dim (64, 128 or 256)");
ABSL_FLAG(int, block_size, 16, "page size in tokens (16, 32 or 64)");
ABSL_FLAG(std::string, dtype, "bf16", "cache dtype: fp32, fp16 or bf16");
ABSL_FLAG(int, reps, 5, "timed runs of the linear launcher (median reported)");

namespace mempipe {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Finite random values in the cache dtype: a pool of 2^24 random elements, repeated.
std::vector<uint8_t> RandomBytes(DType dtype, size_t n, uint64_t seed) {
  const size_t pool_n = std::min<size_t>(n, size_t{1} << 24);
  std::vector<uint8_t> pool(pool_n * DTypeSize(dtype));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < pool_n; ++i) StoreFromFloat(pool.data(), dtype, i, normal(rng));
  std::vector<uint8_t> v(n * DTypeSize(dtype));
  for (size_t off = 0; off < v.size(); off += pool.size()) {
    std::memcpy(v.data() + off, pool.data(), std::min(pool.size(), v.size() - off));
  }
  return v;
}

template <typename Fn>
absl::StatusOr<double> TimeMs(Fn fn) {
  MEMPIPE_RETURN_IF_ERROR(GpuSynchronize());
  const double t0 = Now();
  MEMPIPE_RETURN_IF_ERROR(fn());
  MEMPIPE_RETURN_IF_ERROR(GpuSynchronize());
  return (Now() - t0) * 1e3;
}

// The last quadratic measurement (tokens, ms), for the extrapolation of --legacy_budget_s.
int g_legacy_n = 0;
double g_legacy_ms = 0;

absl::Status RunOne(int n, DType dtype, int kv_heads, int head_dim, int bs, int reps,
                    int legacy_max, double legacy_budget_s) {
  const int pages = (n + bs - 1) / bs;
  const size_t row = static_cast<size_t>(kv_heads) * head_dim;
  KvCacheView cache{nullptr, dtype, pages, bs, kv_heads, head_dim};
  std::fprintf(stderr, "[append] %d tokens: preparing %.2f GB of K/V on the host\n", n,
               2.0 * n * row * DTypeSize(dtype) / 1e9);
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(n));
  std::vector<int64_t> slots(n);
  for (int t = 0; t < n; ++t) slots[t] = static_cast<int64_t>(table[t / bs]) * bs + t % bs;
  const std::vector<uint8_t> key = RandomBytes(dtype, n * row, 1 + n);
  const std::vector<uint8_t> value = RandomBytes(dtype, n * row, 2 + n);

  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_cache, DeviceBuffer::Allocate(cache.NumBytes()));
  cache.data = d_cache.data();
  const DigestView dg_shape{nullptr, dtype, pages, kv_heads, head_dim};
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_dg, DeviceBuffer::Allocate(dg_shape.NumBytes()));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_ref, DeviceBuffer::Allocate(dg_shape.NumBytes()));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_key, DeviceBuffer::Allocate(key.size()));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_value, DeviceBuffer::Allocate(value.size()));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_slots, DeviceBuffer::Allocate(n * sizeof(int64_t)));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_table, DeviceBuffer::Allocate(pages * sizeof(int32_t)));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_len, DeviceBuffer::Allocate(sizeof(int32_t)));
  MEMPIPE_ASSIGN_OR_RETURN(DeviceBuffer d_ws, DeviceBuffer::Allocate(AppendWorkspaceBytes(cache)));
  MEMPIPE_RETURN_IF_ERROR(d_key.CopyFromHost(key.data(), key.size()));
  MEMPIPE_RETURN_IF_ERROR(d_value.CopyFromHost(value.data(), value.size()));
  MEMPIPE_RETURN_IF_ERROR(d_slots.CopyFromHost(slots.data(), n * sizeof(int64_t)));
  MEMPIPE_RETURN_IF_ERROR(d_table.CopyFromHost(table.data(), pages * sizeof(int32_t)));
  MEMPIPE_RETURN_IF_ERROR(d_len.CopyFromHost(&n, sizeof(int32_t)));
  DigestView dg = dg_shape, ref = dg_shape;
  dg.data = d_dg.data();
  ref.data = d_ref.data();
  const auto* d_slot_ptr = static_cast<const int64_t*>(d_slots.data());

  auto check = [&](const char* what) -> absl::Status {
    const BlockTableView tv{static_cast<const int32_t*>(d_table.data()),
                            static_cast<const int32_t*>(d_len.data()), 1, pages};
    MEMPIPE_RETURN_IF_ERROR(BuildDigestsGpu(cache, tv, ref, nullptr));
    std::vector<uint8_t> got(dg.NumBytes()), want(dg.NumBytes());
    MEMPIPE_RETURN_IF_ERROR(d_dg.CopyToHost(got.data(), got.size()));
    MEMPIPE_RETURN_IF_ERROR(d_ref.CopyToHost(want.data(), want.size()));
    if (got != want) {
      return absl::InternalError(absl::StrCat(what, ": digests differ from BuildDigestsGpu"));
    }
    return absl::OkStatus();
  };

  std::vector<double> ms;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    MEMPIPE_ASSIGN_OR_RETURN(double t, TimeMs([&] {
                               return AppendKvAndDigestsGpu(cache, d_slot_ptr, n, d_key.data(),
                                                            d_value.data(), dg, d_ws.data(),
                                                            d_ws.size(), nullptr);
                             }));
    ms.push_back(t);
  }
  MEMPIPE_RETURN_IF_ERROR(check("linear append"));
  std::sort(ms.begin(), ms.end());
  const double linear = ms[ms.size() / 2];
  // Bytes the append must move: K and V read, K and V written, the digests written.
  const double bytes = 4.0 * n * row * DTypeSize(dtype) + dg.NumBytes();
  std::string legacy = "not run (--legacy_max_tokens)", speedup = "";
  const double predicted_ms = g_legacy_n > 0 ? g_legacy_ms * (static_cast<double>(n) / g_legacy_n) *
                                                   (static_cast<double>(n) / g_legacy_n)
                                             : 0;
  if (n <= legacy_max && predicted_ms > legacy_budget_s * 1e3) {
    legacy = absl::StrCat("not run: ~", absl::SixDigits(predicted_ms / 1e3),
                          " s extrapolated (quadratic, **modeled**)");
  } else if (n <= legacy_max) {
    std::fprintf(stderr, "[append] %d tokens: the quadratic kernel (one run)\n", n);
    MEMPIPE_ASSIGN_OR_RETURN(double t, TimeMs([&] {
                               return bench::LegacyAppendKvAndDigestsGpu(
                                   cache, d_slot_ptr, n, d_key.data(), d_value.data(), dg, nullptr);
                             }));
    MEMPIPE_RETURN_IF_ERROR(check("quadratic append"));
    legacy = absl::StrCat(absl::SixDigits(t), " ms");
    g_legacy_n = n;
    g_legacy_ms = t;
    speedup = absl::StrCat(absl::SixDigits(t / linear), "x");
  }
  std::printf("| %d | %s | %.3f ms | %.0f GB/s | %s | %s |\n", n, DTypeName(dtype).data(), linear,
              bytes / (linear * 1e-3) / 1e9, legacy.c_str(), speedup.c_str());
  std::fflush(stdout);
  return absl::OkStatus();
}

}  // namespace
}  // namespace mempipe

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times the GPU bulk KV append + digest update (mempipe-gpu-append-bench --help)");
  absl::ParseCommandLine(argc, argv);
  if (mempipe::GpuDeviceCount() == 0) {
    std::fprintf(stderr, "mempipe-gpu-append-bench: no GPU device\n");
    return 1;
  }
  const absl::StatusOr<mempipe::DType> dtype = mempipe::ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) {
    std::fprintf(stderr, "--dtype: %s\n", std::string(dtype.status().message()).c_str());
    return 2;
  }
  std::vector<int> tokens;
  for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(t, &v) || v <= 0) {
      std::fprintf(stderr, "--tokens: '%s' is not a positive integer\n", std::string(t).c_str());
      return 2;
    }
    tokens.push_back(v);
  }
  std::printf(
      "| tokens | dtype | linear append | effective bandwidth | quadratic (pre-fix) | speedup |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (int n : tokens) {
    const absl::Status s = mempipe::RunOne(
        n, *dtype, absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_head_dim),
        absl::GetFlag(FLAGS_block_size), absl::GetFlag(FLAGS_reps),
        absl::GetFlag(FLAGS_legacy_max_tokens), absl::GetFlag(FLAGS_legacy_budget_s));
    if (!s.ok()) {
      std::fprintf(stderr, "mempipe-gpu-append-bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  return 0;
}
