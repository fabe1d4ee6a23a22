// mempipe-bench: long-context decode throughput, split into the four memory-processing steps.
//
//   mempipe-bench                                  # Llama-3-8B attention, 32K context, CPU
//   mempipe-bench --context=131072 --placements=dense,cpu --json=out.json
//   mempipe-bench --placement=fpga --mode=pipelined --micro-batches=4   # through the pipeline
//   mempipe-bench --pipelines="gpu;fpga;fpga:pipelined:micro_batches=4;fpga:reuse=4"
//   mempipe-bench --helpfull                       # every flag
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#if defined(MEMPIPE_BENCH_WITH_GPU)
#include "backend/gpu/gpu_apply_device.h"
#include "core/gpu/gpu_runtime.h"
#include "core/status_macros.h"
#include "retriever/gpu/gpu_page_selector.h"
#endif
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "attention/decode.h"
#include "backend/selector_registry.h"
#include "core/status_macros.h"
#include "fpga/fpga_selector.h"
#include "integration/bench/decode_bench.h"
#include "integration/bench/membw.h"
#include "integration/bench/pipeline_bench.h"
#include "nlohmann/json.hpp"
#include "retriever/hierarchical.h"
#include "tests/testing/fault_injecting_selector.h"

ABSL_FLAG(int, layers, 32, "Transformer layers (each has its own KV cache)");
ABSL_FLAG(int, num_heads, 32, "Query heads per layer");
ABSL_FLAG(int, num_kv_heads, 8, "KV heads per layer (GQA groups = num_heads / num_kv_heads)");
ABSL_FLAG(int, head_dim, 128, "Head dimension: 64, 128 or 256");
ABSL_FLAG(std::string, dtype, "bf16", "KV cache, query and output dtype: fp32, fp16 or bf16");
ABSL_FLAG(int, page_size, 16, "Tokens per KV page (block_size): 16, 32 or 64");
ABSL_FLAG(int, batch, 1, "Sequences decoded together");
ABSL_FLAG(int, context, 32768, "Prompt tokens per sequence");
ABSL_FLAG(bool, ragged, false, "Sequence s gets context * (1 - s / (2 * batch)) tokens");
ABSL_FLAG(int, steps, 4, "Timed decode steps per placement (one token per sequence each)");
ABSL_FLAG(int, warmup, 1, "Untimed decode steps before the timed ones");
ABSL_FLAG(int, budget, 4096, "Token budget per (sequence, KV head): budget / page_size pages");
ABSL_FLAG(int, sink_pages, 1, "First pages always selected");
ABSL_FLAG(int, local_pages, 1, "Last pages (the partial page included) always selected");
ABSL_FLAG(int, dense_layers, 2, "First layers that always decode densely (Quest keeps 2)");
ABSL_FLAG(std::string, aggregation, "max", "GQA score aggregation over a group: max or sum");
ABSL_FLAG(std::string, hierarchy, "none",
          "Two-level selection (retriever/hierarchical.h): none, or <page>in<super-page> in "
          "tokens, e.g. 16in64 (LServe's geometry: score 64-token super-pages, then the 16-token "
          "pages of the best ones); the prompt's blocks are then allocated in aligned groups");
ABSL_FLAG(int, hierarchy_expansion, 2,
          "With --hierarchy: super-pages kept = this x ceil(middle budget pages / pages per "
          "super-page)");
ABSL_FLAG(int, fpga_cards, 1,
          "KV heads sharded over this many emulated U55Cs (fpga/sharded_selector.h); modeled "
          "time is the slowest card's plus the host's fan-out/fan-in, energy the sum");
ABSL_FLAG(std::string, kv_layout, "token",
          "Host KV cache layout: token (token-major, vLLM's FlashAttention layout; the gpu "
          "placement needs it), head (head-major: each KV head's page contiguous, what the "
          "vLLM plugin uses for host caches), page (page-major: a KV head's K page and V page "
          "one contiguous piece), head_kt or page_kt (head- or page-major with each K page "
          "transposed, [head_dim / x, page, x] with x channels of 4 bytes; host placements only)");
ABSL_FLAG(std::string, digest_dtype, "native",
          "Page digests the selector stores and scans: native (max/min in the cache dtype) or "
          "int8 (codes rounded outward + one fp32 scale per page and KV head, the bound kept "
          "valid; retriever/int8_quant.h). With int8 and --check_accuracy the last step also "
          "reports the recall of the int8 selection against the native one");
ABSL_FLAG(int, heavy_hitters, 8, "Heavy-hitter tokens per (sequence, KV head) in the prompt");
ABSL_FLAG(std::string, placements, "dense,cpu",
          "Comma-separated placements to run side by side: dense (baseline), cpu");
ABSL_FLAG(bool, check_accuracy, true,
          "On the last step also decode sparse layers densely and report the relative L2 error");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the synthetic context");
ABSL_FLAG(int, threads, 0,
          "Host threads for filling caches and CPU attention (0: all hardware threads)");
ABSL_FLAG(std::string, cpu_kernel, "auto",
          "Host kernels (core/cpu_kernel.h: attention and the cpu selector's relevancy scan): "
          "auto (the first the CPU has of avx512-bf16, avx512, avx2, portable), portable, "
          "avx512, avx512-bf16 (AVX512_BF16 dot products for bf16 attention scores) or avx2 "
          "(AVX2, FMA and F16C: CPUs without AVX-512)");
ABSL_FLAG(int, bandwidth_mib, -1,
          "Buffer of the STREAM-like read that measures the machine's memory bandwidth before "
          "and after the placements (the apply columns are reported as a fraction of the better "
          "of the two); -1: at least 4x the last-level cache and 256 MiB, so that it reads "
          "DRAM; 0 skips it");
ABSL_FLAG(std::string, json, "", "Also write the results to this JSON file");
ABSL_FLAG(std::string, placement, "",
          "Also run this placement through the stage pipeline (backend/decode_pipeline.h): a "
          "preset (dense, cpu, gpu, fpga) or prepare=..,relevancy=..,retrieval=..,apply=.. over "
          "cpu|gpu|fpga; printed beside --placements with the pipeline's metrics");
ABSL_FLAG(std::string, mode, "sync",
          "Pipeline mode for --placement: sync, or pipelined (micro-batches overlap selection "
          "with decoding)");
ABSL_FLAG(int, micro_batches, 1, "Micro-batches per step in --mode=pipelined");
ABSL_FLAG(std::string, pipelines, "",
          "Several stage-pipeline runs side by side, ';'-separated, each "
          "<placement>[:sync|:pipelined][:micro_batches=N][:reuse=C] (unset parts from --mode, "
          "--micro_batches, --reuse), e.g. \"gpu;fpga;fpga:pipelined:micro_batches=4;"
          "fpga:reuse=4\"; run after --placement");
ABSL_FLAG(int, reuse, 1, "A selection serves this many decode steps (LServe uses 4)");
ABSL_FLAG(double, deadline_ms, 1000,
          "Deadline of each selection; a late, failing or dead selector is replaced by local "
          "selection on the apply device (counted as a fallback)");
ABSL_FLAG(bool, fpga_paced, true,
          "The emulated U55C completes each request no earlier than its modeled device time, so "
          "overlap in the pipeline behaves as with a card");
ABSL_FLAG(std::string, fpga_functional, "hls",
          "What computes the emulated U55C's selections: hls (the HLS kernels in C simulation) or "
          "reference (the multi-threaded CPU reference, same bits, much faster); the modeled "
          "card time and the pacing are the same either way");
ABSL_FLAG(double, stand_in_gbps, 0,
          "If > 0, a gpu or fpga selector device this program has no selector for is served by "
          "a paced stand-in: the CPU reference's result, completed after "
          "--stand_in_launch_us + digest bytes / (this many GB/s) (modeled, labeled so)");
ABSL_FLAG(double, stand_in_launch_us, 50,
          "Per-request latency of the --stand_in_gbps stand-in (FPGA-NOTES.md: 16-100 us launch)");

namespace mempipe {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "mempipe-bench: %s\n", std::string(s.message()).c_str());
  return 2;
}

// Selectors this program links in beyond the built-in CPU one: the FPGA library's (the emulated
// U55C unless XRT and a card are asked for), and, for devices still without one, the paced
// stand-in of --stand_in_gbps (the CPU reference paced as the device: tests/testing/
// fault_injecting_selector.h). A GPU library adds its factory here the same way.
void RegisterSelectors(int threads, int pages_per_super_page) {
  RegisterPageSelectorFactory(Device::kCpu, "cpu", [threads] {
    return absl::StatusOr<std::unique_ptr<PageSelector>>(
        std::make_unique<CpuPageSelector>(threads));
  });
  const bool paced = absl::GetFlag(FLAGS_fpga_paced);
  const std::string functional_name = absl::GetFlag(FLAGS_fpga_functional);
  const int cards = absl::GetFlag(FLAGS_fpga_cards);
  RegisterPageSelectorFactory(
      Device::kFpga, "fpga (fpga/fpga_selector.h)",
      [paced, functional_name, threads, cards,
       pages_per_super_page]() -> absl::StatusOr<std::unique_ptr<PageSelector>> {
        FpgaOptions o;
        o.paced = paced;
        MEMPIPE_ASSIGN_OR_RETURN(o.functional, ParseEmulatedFunctional(functional_name));
        o.reference_threads = std::max(1, threads);
        o.cards = cards;
        o.pages_per_super_page = pages_per_super_page;
        return MakeFpgaSelector(o);
      });
#if defined(MEMPIPE_BENCH_WITH_GPU)
  // The real GPU selector (retriever/gpu/gpu_page_selector.h), on a build with GPU kernels and
  // a machine with a GPU; elsewhere the paced stand-in below may take its place.
  if (GpuDeviceCount() > 0) {
    RegisterPageSelectorFactory(Device::kGpu, "gpu (retriever/gpu/gpu_page_selector.h)",
                                []() -> absl::StatusOr<std::unique_ptr<PageSelector>> {
                                  MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<GpuPageSelector> s,
                                                           GpuPageSelector::Create());
                                  return std::unique_ptr<PageSelector>(std::move(s));
                                });
    // Step 4 on the GPU decode kernels (backend/gpu/gpu_apply_device.h): placement gpu and the
    // dense baseline decode there (integration/bench/decode_bench.h, BenchApplyDevice).
    RegisterApplyDeviceFactory(Device::kGpu, "gpu (backend/gpu/gpu_apply_device.h)",
                               []() -> absl::StatusOr<std::unique_ptr<ApplyDevice>> {
                                 MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<GpuApplyDevice> d,
                                                          GpuApplyDevice::Create());
                                 return std::unique_ptr<ApplyDevice>(std::move(d));
                               });
  }
#endif
  const double gbps = absl::GetFlag(FLAGS_stand_in_gbps);
  if (gbps <= 0) return;
  const double launch_us = absl::GetFlag(FLAGS_stand_in_launch_us);
  for (Device d : {Device::kGpu, Device::kFpga}) {
    if (HasPageSelectorFactory(d)) continue;
    // Named for what it is: the CPU reference selector, paced as a modeled device.
    const std::string name = absl::StrFormat(
        "cpu-reference-paced-as-%s(%.0f us + %.0f GB/s, modeled)", DeviceName(d), launch_us, gbps);
    RegisterPageSelectorFactory(d, name, [=]() -> absl::StatusOr<std::unique_ptr<PageSelector>> {
      FaultInjectionOptions o;
      o.name = name;
      o.delay_ms = launch_us * 1e-3;
      o.scan_gbytes_per_s = gbps;
      o.report_delay_as_modeled = true;
      return std::make_unique<FaultInjectingSelector>(o);
    });
  }
}

int Main() {
  SyntheticContextConfig cfg;
  cfg.shape = ModelShape{absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_num_heads),
                         absl::GetFlag(FLAGS_num_kv_heads), absl::GetFlag(FLAGS_head_dim)};
  auto dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return Fail(dtype.status());
  cfg.dtype = *dtype;
  cfg.block_size = absl::GetFlag(FLAGS_page_size);
  cfg.batch = absl::GetFlag(FLAGS_batch);
  cfg.context = absl::GetFlag(FLAGS_context);
  cfg.ragged = absl::GetFlag(FLAGS_ragged);
  cfg.heavy_hitters = absl::GetFlag(FLAGS_heavy_hitters);
  cfg.seed = absl::GetFlag(FLAGS_seed);
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cfg.threads = absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads) : hw;
  if (auto f = ParseEmulatedFunctional(absl::GetFlag(FLAGS_fpga_functional)); !f.ok()) {
    return Fail(f.status());  // before the prefill, not at the first fpga placement
  }
  const int bw_mib = absl::GetFlag(FLAGS_bandwidth_mib);
  if (bw_mib < -1) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--bandwidth_mib must be -1 (auto), 0 (skip) or a size in MiB, got ", bw_mib)));
  }
  auto kernel = ParseCpuKernel(absl::GetFlag(FLAGS_cpu_kernel));
  if (!kernel.ok()) return Fail(kernel.status());
  if (absl::Status s = SetCpuKernel(*kernel); !s.ok()) return Fail(s);

  BenchOptions options;
  options.steps = absl::GetFlag(FLAGS_steps);
  options.warmup = absl::GetFlag(FLAGS_warmup);
  options.check_accuracy = absl::GetFlag(FLAGS_check_accuracy);
  options.threads = cfg.threads;
  options.policy.dense_layers = absl::GetFlag(FLAGS_dense_layers);
  options.policy.selection.budget_tokens = absl::GetFlag(FLAGS_budget);
  options.policy.selection.num_sink_pages = absl::GetFlag(FLAGS_sink_pages);
  options.policy.selection.num_local_pages = absl::GetFlag(FLAGS_local_pages);
  auto agg = ParseGroupAggregation(absl::GetFlag(FLAGS_aggregation));
  if (!agg.ok()) return Fail(agg.status());
  options.policy.selection.aggregation = *agg;
  auto hierarchy = ParsePageHierarchy(absl::GetFlag(FLAGS_hierarchy), cfg.block_size);
  if (!hierarchy.ok()) return Fail(hierarchy.status());
  options.policy.selection.hierarchy = *hierarchy;
  options.policy.selection.hierarchy.expansion = absl::GetFlag(FLAGS_hierarchy_expansion);
  cfg.block_group = hierarchy->pages_per_super_page;
  auto layout = ParseKvLayout(absl::GetFlag(FLAGS_kv_layout));
  if (!layout.ok()) return Fail(layout.status());
  cfg.layout = *layout;
  RegisterSelectors(cfg.threads, hierarchy->pages_per_super_page);
  auto digest_format = ParseDigestFormat(absl::GetFlag(FLAGS_digest_dtype));
  if (!digest_format.ok()) return Fail(digest_format.status());
  options.digest_format = *digest_format;
  cfg.max_new_tokens = std::max(1, options.steps + options.warmup);
  if (absl::Status s = ValidateSyntheticContextConfig(cfg); !s.ok()) return Fail(s);
  if (absl::Status s = ValidateSparsityPolicy(options.policy, cfg.block_size); !s.ok()) {
    return Fail(s);
  }
  std::vector<std::string> placements =
      absl::StrSplit(absl::GetFlag(FLAGS_placements), ',', absl::SkipEmpty());
  if (placements.empty()) return Fail(absl::InvalidArgumentError("--placements is empty"));

  const ModelShape& m = cfg.shape;
  std::printf("mempipe-bench: %d layers, %d q heads / %d KV heads, head_dim %d, %s, page %d\n",
              m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
              std::string(DTypeName(cfg.dtype)).c_str(), cfg.block_size);
  std::printf(
      "  batch %d x context %d%s, budget %d tokens (%d pages), %d sink + %d local pages, "
      "%d dense layers, aggregation %s, hierarchy %s, %d FPGA card(s), %s digests\n",
      cfg.batch, cfg.context, cfg.ragged ? " (ragged)" : "", options.policy.selection.budget_tokens,
      options.policy.selection.PagesPerHead(cfg.block_size),
      options.policy.selection.num_sink_pages, options.policy.selection.num_local_pages,
      options.policy.dense_layers,
      std::string(GroupAggregationName(options.policy.selection.aggregation)).c_str(),
      PageHierarchyName(options.policy.selection.hierarchy, cfg.block_size).c_str(),
      absl::GetFlag(FLAGS_fpga_cards),
      std::string(DigestFormatName(options.digest_format)).c_str());
  std::printf(
      "  machine: %d hardware threads, %d used; all times measured on this machine's CPU; "
      "attention kernel %s\n",
      hw, cfg.threads, std::string(ActiveCpuKernelName()).c_str());
  std::printf(
      "  fpga: emulated U55C, %s, selections computed by %s (timing modeled: "
      "fpga/emulation/u55c_params.h)\n",
      absl::GetFlag(FLAGS_fpga_paced) ? "paced to its modeled time" : "not paced",
      absl::GetFlag(FLAGS_fpga_functional) == "reference" ? "the CPU reference"
                                                          : "the HLS kernels in C simulation");

  SyntheticContext ctx(cfg);
  const absl::Time fill_start = absl::Now();
  absl::Status filled = ctx.Prefill([&](int done) {
    std::fprintf(stderr, "\r[prefill] %d/%d layers", done, m.num_layers);
    if (done == m.num_layers) std::fprintf(stderr, "\n");
  });
  if (!filled.ok()) return Fail(filled);
  std::printf("  KV cache: %.2f GiB (%.1f MiB per layer), filled in %.1f s\n",
              ctx.CacheBytesPerLayer() * m.num_layers / 1073741824.0,
              ctx.CacheBytesPerLayer() / 1048576.0,
              absl::ToDoubleSeconds(absl::Now() - fill_start));

  // The machine's read bandwidth, before and after the placements (other load varies).
  const size_t bw_bytes = bw_mib < 0 ? MemoryReadBytes() : static_cast<size_t>(bw_mib) << 20;
  std::vector<ReadBandwidth> bandwidth;
  auto measure_bandwidth = [&]() -> absl::Status {
    if (bw_bytes == 0) return absl::OkStatus();
    auto bw = MeasureReadBandwidth(bw_bytes, cfg.threads, 5);
    if (!bw.ok()) return bw.status();
    std::fprintf(stderr, "[bandwidth] %.1f GB/s (%zu MiB read by %d threads, best of %d)\n",
                 bw->gbytes_per_s, bw->bytes >> 20, bw->threads, bw->passes);
    bandwidth.push_back(*bw);
    return absl::OkStatus();
  };
  if (absl::Status s = measure_bandwidth(); !s.ok()) return Fail(s);

  std::vector<PlacementResult> results;
  for (const std::string& p : placements) {
    auto r = RunPlacement(ctx, options, p, [&](int step, int total, double ms) {
      std::fprintf(stderr, "[%s] step %d/%d  %.1f ms%s\n", p.c_str(), step, total, ms,
                   step <= options.warmup ? " (warm-up)" : "");
    });
    if (!r.ok()) return Fail(r.status());
    results.push_back(*std::move(r));
  }

  // Stage-pipeline runs: --placement (with --mode, --micro_batches, --reuse), then --pipelines.
  std::vector<PipelineBenchOptions> runs;
  {
    PipelineBenchOptions defaults;
    auto mode = ParsePipelineMode(absl::GetFlag(FLAGS_mode));
    if (!mode.ok()) return Fail(mode.status());
    defaults.mode = *mode;
    defaults.micro_batches = absl::GetFlag(FLAGS_micro_batches);
    defaults.reuse = absl::GetFlag(FLAGS_reuse);
    defaults.deadline_ms = absl::GetFlag(FLAGS_deadline_ms);
    if (const std::string spec = absl::GetFlag(FLAGS_placement); !spec.empty()) {
      runs.push_back(defaults);
      runs.back().placement = spec;
    }
    for (absl::string_view run :
         absl::StrSplit(absl::GetFlag(FLAGS_pipelines), ';', absl::SkipWhitespace())) {
      auto po = ParsePipelineRun(run, defaults);
      if (!po.ok()) return Fail(po.status());
      runs.push_back(*po);
    }
  }
  std::vector<PipelinePlacementResult> piped;
  for (const PipelineBenchOptions& po : runs) {
    const std::string label =
        absl::StrCat(po.placement, " ", PipelineModeName(po.mode),
                     po.mode == PipelineMode::kPipelined ? absl::StrCat("x", po.micro_batches) : "",
                     po.reuse > 1 ? absl::StrCat(" reuse ", po.reuse) : "");
    auto r = RunPipelinePlacement(ctx, options, po, [&](int step, int total, double ms) {
      std::fprintf(stderr, "[%s] step %d/%d  %.1f ms%s\n", label.c_str(), step, total, ms,
                   step <= options.warmup ? " (warm-up)" : "");
    });
    if (!r.ok()) return Fail(r.status());
    piped.push_back(*std::move(r));
    results.push_back(piped.back().result);
  }

  if (absl::Status s = measure_bandwidth(); !s.ok()) return Fail(s);
  double machine_gbps = 0, machine_cpu_gbps = 0;
  for (const auto& b : bandwidth) {
    machine_gbps = std::max(machine_gbps, b.gbytes_per_s);
    machine_cpu_gbps = std::max(machine_cpu_gbps, b.gbytes_per_cpu_s);
  }
  // K/V bytes attention read per second: the last step's bytes over the mean apply time, wall
  // and CPU time (per thread).
  auto apply_gbps = [](const PlacementResult& r) {
    return r.mean.apply_ms > 0 ? r.kv_bytes_per_step / (r.mean.apply_ms * 1e-3) / 1e9 : 0.0;
  };
  auto apply_cpu_gbps = [&](const PlacementResult& r) {
    const double per_thread_s = r.mean.apply_cpu_ms * 1e-3 / options.threads;
    return per_thread_s > 0 ? r.kv_bytes_per_step / per_thread_s / 1e9 : 0.0;
  };

  const PlacementResult* dense = nullptr;
  for (const auto& r : results) {
    if (r.placement == "dense") dense = &r;
  }
  std::printf("\nper decode step (one token per sequence, all %d layers), milliseconds:\n",
              m.num_layers);
  int name_width = 10;
  for (const auto& r : results) name_width = std::max<int>(name_width, r.placement.size());
  std::printf("%-*s %9s %9s %9s %9s %9s %9s %8s %9s %8s %10s\n", name_width, "placement", "append",
              "prepare", "relevancy", "retrieval", "apply", "total", "memproc", "tokens/s",
              "speedup", "rel.err");
  for (const auto& r : results) {
    const double share =
        r.mean.Total() > 0 ? 100.0 * r.mean.MemoryProcessing() / r.mean.Total() : 0;
    std::string speedup = dense ? absl::StrFormat("%.2fx", dense->median_step_ms / r.median_step_ms)
                                : std::string("-");
    std::string err = r.rel_l2_error ? absl::StrFormat("%.2e", *r.rel_l2_error) : std::string("-");
    std::printf("%-*s %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %7.1f%% %9.2f %8s %10s\n", name_width,
                r.placement.c_str(), r.mean.append_ms, r.mean.prepare_ms, r.mean.relevancy_ms,
                r.mean.retrieval_ms, r.mean.apply_ms, r.median_step_ms, share, r.tokens_per_s,
                speedup.c_str(), err.c_str());
  }
  std::printf("\nstep 4 (apply) ran on: ");
  for (const auto& r : results) {
    std::printf("%s: %s; ", r.placement.c_str(), r.apply_device.c_str());
  }
  std::printf("\nbytes read per step (last step): ");
  for (const auto& r : results) {
    std::printf("%s: KV %.1f MiB + digests %.1f MiB (%d sparse layers); ", r.placement.c_str(),
                r.kv_bytes_per_step / 1048576.0, r.digest_bytes_per_step / 1048576.0,
                r.sparse_layers);
  }
  std::printf("\n");
  std::printf("selection vs the exact flat selection (last step, middle pages): ");
  for (const auto& r : results) {
    if (!r.recall_vs_flat) continue;
    std::printf("%s: recall %.4f, %.0f of %.0f flat digest rows scanned; ", r.placement.c_str(),
                *r.recall_vs_flat, r.digest_rows_per_step, r.flat_digest_rows_per_step);
  }
  std::printf("\n");
  for (const auto& r : results) {
    if (r.digest_recall) {
      std::printf(
          "%s int8 digests: recall %.4f of the middle pages the native-digest selection picks "
          "(last step, sparse layers)\n",
          r.placement.c_str(), *r.digest_recall);
    }
  }
  if (machine_gbps > 0) {
    std::printf("memory read bandwidth (STREAM-like read, %d threads, %zu MiB, %s loads): ",
                bandwidth[0].threads, bandwidth[0].bytes >> 20, bandwidth[0].kernel.c_str());
    for (size_t i = 0; i < bandwidth.size(); ++i) {
      std::printf("%s%s %.1f GB/s wall, %.1f GB/s per thread CPU time", i ? "; " : "",
                  i ? "after" : "before", bandwidth[i].gbytes_per_s, bandwidth[i].gbytes_per_cpu_s);
    }
    std::printf("\n");
    for (const auto& r : results) {
      if (r.apply_device != "cpu") continue;  // the host's bandwidth says nothing of a GPU's
      std::printf(
          "  %-6s apply (%s kernel) reads %.1f MiB of K/V: wall %.1f ms = %.1f GB/s = %.0f%% of "
          "%.1f; CPU %.1f ms per thread = %.1f GB/s = %.0f%% of %.1f\n",
          r.placement.c_str(), std::string(ActiveCpuKernelName()).c_str(),
          r.kv_bytes_per_step / 1048576.0, r.mean.apply_ms, apply_gbps(r),
          100 * apply_gbps(r) / machine_gbps, machine_gbps, r.mean.apply_cpu_ms / options.threads,
          apply_cpu_gbps(r), 100 * apply_cpu_gbps(r) / machine_cpu_gbps, machine_cpu_gbps);
    }
    for (const auto& r : results) {
      // Steps 2+3 on the host: the digest scan (the bytes) and the top-k, as a read rate.
      if (r.selector != "cpu" || r.digest_bytes_per_step <= 0 || r.mean.select_cpu_ms <= 0) {
        continue;
      }
      const double wall_s = (r.mean.relevancy_ms + r.mean.retrieval_ms) * 1e-3;
      const double cpu_s = r.mean.select_cpu_ms * 1e-3 / options.threads;
      const double wall_gbps = r.digest_bytes_per_step / wall_s / 1e9;
      const double cpu_gbps = r.digest_bytes_per_step / cpu_s / 1e9;
      std::printf(
          "  %-6s relevancy + retrieval (%s kernel) read %.1f MiB of digests: wall %.1f ms = "
          "%.1f GB/s = %.0f%% of %.1f; CPU %.1f ms per thread = %.1f GB/s = %.0f%% of %.1f\n",
          r.placement.c_str(), std::string(ActiveCpuKernelName()).c_str(),
          r.digest_bytes_per_step / 1048576.0, wall_s * 1e3, wall_gbps,
          100 * wall_gbps / machine_gbps, machine_gbps, cpu_s * 1e3, cpu_gbps,
          100 * cpu_gbps / machine_cpu_gbps, machine_cpu_gbps);
    }
    std::printf(
        "  (wall: elapsed time; CPU: the threads' CPU time, which leaves out time other work on "
        "a shared machine took from them; the bandwidth is the best pass of either run)\n");
  }
  for (const auto& r : results) {
    if (r.bulk_prepare_ms > 0) {
      std::printf("bulk digest build after prefill (%s): %.1f ms for all layers (measured)",
                  r.placement.c_str(), r.bulk_prepare_ms);
      if (r.modeled_bulk_prepare_ms) {
        std::printf("; %.2f ms on the device (modeled, %s)", *r.modeled_bulk_prepare_ms,
                    r.selector.c_str());
      }
      std::printf("\n");
    }
  }
  for (const auto& r : results) {
    if (!r.modeled_device_ms_per_step) continue;
    std::printf(
        "%s steps 1-3 per decode step: %.2f ms measured on this host (%s %s) vs %.3f ms, %.2f mJ "
        "on the device (modeled)\n",
        r.placement.c_str(), r.mean.MemoryProcessing(), r.selector.c_str(),
        r.selector.find("reference functional") != std::string::npos
            ? "computes the CPU reference"
            : "runs the kernels in C simulation",
        *r.modeled_device_ms_per_step, r.modeled_energy_mj_per_step.value_or(0));
  }
  std::printf(
      "total = median step time; memproc = (prepare + relevancy + retrieval) / total; a selector\n"
      "that fuses steps 2+3 (gpu) reports no split: its measured Submit-to-Wait time is under "
      "relevancy;\n"
      "speedup = dense median / placement median; rel.err = ||sparse - dense|| / ||dense||"
      " over sparse layers.\n");
  for (const PipelinePlacementResult& run : piped) {
    const PipelineMetrics& pm = run.metrics;
    std::printf(
        "\n%s: through the stage pipeline; its total is the wall time of append + "
        "Step(), its breakdown columns are stage busy times that overlap.\n",
        run.result.placement.c_str());
    std::printf("%s", pm.ToText().c_str());
    const double per_step = 1.0 / std::max<uint64_t>(pm.steps, 1);
    std::printf(
        "hidden: %.1f%% of the selector stage's busy time (%.2f ms per step, measured "
        "wall time on this machine, pacing included) ran while the decoder was busy\n",
        100 * pm.HiddenFraction(), pm.selector_busy_ms * per_step);
    if (pm.modeled_calls > 0) {
      std::printf(
          "modeled: the selector device's own time is %.2f ms per step (modeled, %s); "
          "a paced device's busy time above includes it\n",
          pm.modeled_device_ms * per_step, pm.selector.c_str());
    }
  }

  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    nlohmann::json j;
    j["machine"] = {{"cpu", CpuDescription()},
                    {"hardware_threads", hw},
                    {"threads_used", cfg.threads},
                    {"timing", "measured, host CPU"},
                    {"attention_kernel", std::string(ActiveCpuKernelName())}};
    for (const auto& b : bandwidth) {
      j["machine"]["read_bandwidth"].push_back({{"gbytes_per_s", b.gbytes_per_s},
                                                {"gbytes_per_cpu_s", b.gbytes_per_cpu_s},
                                                {"bytes", b.bytes},
                                                {"threads", b.threads},
                                                {"passes", b.passes},
                                                {"loads", b.kernel}});
    }
    if (machine_gbps > 0) {
      j["machine"]["read_bandwidth_gbps"] = machine_gbps;
      j["machine"]["read_bandwidth_gbps_cpu_time"] = machine_cpu_gbps;
    }
    j["config"] = {
        {"layers", m.num_layers},
        {"num_heads", m.num_heads},
        {"num_kv_heads", m.num_kv_heads},
        {"head_dim", m.head_dim},
        {"dtype", std::string(DTypeName(cfg.dtype))},
        {"page_size", cfg.block_size},
        {"batch", cfg.batch},
        {"context", cfg.context},
        {"ragged", cfg.ragged},
        {"steps", options.steps},
        {"warmup", options.warmup},
        {"budget", options.policy.selection.budget_tokens},
        {"sink_pages", options.policy.selection.num_sink_pages},
        {"local_pages", options.policy.selection.num_local_pages},
        {"dense_layers", options.policy.dense_layers},
        {"aggregation", std::string(GroupAggregationName(options.policy.selection.aggregation))},
        {"fpga_paced", absl::GetFlag(FLAGS_fpga_paced)},
        {"fpga_functional", absl::GetFlag(FLAGS_fpga_functional)},
        {"hierarchy", PageHierarchyName(options.policy.selection.hierarchy, cfg.block_size)},
        {"hierarchy_expansion", options.policy.selection.hierarchy.expansion},
        {"fpga_cards", absl::GetFlag(FLAGS_fpga_cards)},
        {"digest_dtype", std::string(DigestFormatName(options.digest_format))},
        {"seed", cfg.seed}};
    for (const auto& r : results) {
      nlohmann::json p = {{"placement", r.placement},
                          {"selector", r.selector},
                          {"apply_device", r.apply_device},
                          {"append_ms", r.mean.append_ms},
                          {"prepare_ms", r.mean.prepare_ms},
                          {"relevancy_ms", r.mean.relevancy_ms},
                          {"retrieval_ms", r.mean.retrieval_ms},
                          {"apply_ms", r.mean.apply_ms},
                          {"median_step_ms", r.median_step_ms},
                          {"step_ms", r.step_ms},
                          {"memory_processing_share",
                           r.mean.Total() > 0 ? r.mean.MemoryProcessing() / r.mean.Total() : 0},
                          {"tokens_per_s", r.tokens_per_s},
                          {"bulk_prepare_ms", r.bulk_prepare_ms},
                          {"sparse_layers", r.sparse_layers},
                          {"kv_bytes_per_step", r.kv_bytes_per_step},
                          {"digest_bytes_per_step", r.digest_bytes_per_step},
                          {"apply_cpu_ms", r.mean.apply_cpu_ms},
                          {"select_cpu_ms", r.mean.select_cpu_ms},
                          {"apply_gbytes_per_s", apply_gbps(r)},
                          {"apply_gbytes_per_s_cpu_time", apply_cpu_gbps(r)}};
      if (machine_gbps > 0) {
        p["apply_bandwidth_fraction"] = apply_gbps(r) / machine_gbps;
        p["apply_bandwidth_fraction_cpu_time"] = apply_cpu_gbps(r) / machine_cpu_gbps;
      }
      if (dense) p["speedup_over_dense"] = dense->median_step_ms / r.median_step_ms;
      if (r.rel_l2_error) p["rel_l2_error"] = *r.rel_l2_error;
      if (r.recall_vs_flat) {
        p["recall_vs_flat"] = *r.recall_vs_flat;
        p["digest_rows_per_step"] = r.digest_rows_per_step;
        p["flat_digest_rows_per_step"] = r.flat_digest_rows_per_step;
      }
      p["digest_dtype"] = r.digest_format;
      if (r.digest_recall) p["digest_recall_vs_native"] = *r.digest_recall;
      if (r.modeled_device_ms_per_step) {
        p["modeled"] = {{"device_ms_per_step", *r.modeled_device_ms_per_step},
                        {"energy_mj_per_step", r.modeled_energy_mj_per_step.value_or(0)},
                        {"bulk_prepare_ms", r.modeled_bulk_prepare_ms.value_or(0)},
                        {"note", "modeled by " + r.selector + ", not measured"}};
      }
      for (const PipelinePlacementResult& run : piped) {
        if (r.placement == run.result.placement) {
          p["pipeline"] = nlohmann::json::parse(run.metrics.ToJson());
        }
      }
      j["placements"].push_back(p);
    }
    std::ofstream f(path);
    f << j.dump(2) << "\n";
    if (!f) return Fail(absl::UnavailableError("cannot write --json file " + path));
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace mempipe

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Long-context decode benchmark: times prepare / relevancy / retrieval / apply per decode "
      "step for each placement, side by side with dense attention.\n"
      "Example: mempipe-bench --context=65536 --batch=2 --placements=dense,cpu --json=r.json");
  // Accept --micro-batches as well as --micro_batches (the spelling).
  std::vector<std::string> args(argv, argv + argc);
  std::vector<char*> normalized;
  for (std::string& a : args) {
    if (a.rfind("--", 0) == 0) {
      const size_t end = std::min(a.find('='), a.size());
      std::replace(a.begin() + 2, a.begin() + end, '-', '_');
    }
    normalized.push_back(a.data());
  }
  absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  return mempipe::Main();
}
