#include "integration/bench/pipeline_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attention/decode.h"
#include "backend/selector_registry.h"
#include "core/clock.h"
#include "core/status_macros.h"

namespace mempipe {

absl::StatusOr<PipelineBenchOptions> ParsePipelineRun(absl::string_view run,
                                                      const PipelineBenchOptions& defaults) {
  PipelineBenchOptions po = defaults;
  std::vector<std::string> parts = absl::StrSplit(run, ':');
  po.placement = std::string(absl::StripAsciiWhitespace(parts[0]));
  if (po.placement.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--pipelines: run '", run, "' has no placement"));
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string part(absl::StripAsciiWhitespace(parts[i]));
    if (part == "sync" || part == "pipelined") {
      MEMPIPE_ASSIGN_OR_RETURN(po.mode, ParsePipelineMode(part));
      continue;
    }
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    int value = 0;
    if (!absl::SimpleAtoi(kv.second, &value) ||
        (kv.first != "micro_batches" && kv.first != "reuse")) {
      return absl::InvalidArgumentError(
          absl::StrCat("--pipelines: bad part '", part, "' in run '", run,
                       "' (expected sync, pipelined, micro_batches=N or reuse=C)"));
    }
    (kv.first == "reuse" ? po.reuse : po.micro_batches) = value;
  }
  return po;
}

absl::StatusOr<PipelinePlacementResult> RunPipelinePlacement(SyntheticContext& ctx,
                                                             const BenchOptions& options,
                                                             const PipelineBenchOptions& pipeline,
                                                             const ProgressFn& progress) {
  const SyntheticContextConfig& cfg = ctx.config();
  const ModelShape& m = cfg.shape;
  MEMPIPE_RETURN_IF_ERROR(ValidateBenchOptions(options, cfg));
  PipelineOptions po;
  MEMPIPE_ASSIGN_OR_RETURN(po.placement, ParsePlacement(pipeline.placement));
  po.mode = pipeline.mode;
  po.micro_batches = pipeline.micro_batches;
  po.reuse = pipeline.reuse;
  po.deadline_ms = pipeline.deadline_ms;
  po.policy = options.policy;
  po.digest_format = options.digest_format;
  po.apply_threads = std::max(1, options.threads);
  MEMPIPE_ASSIGN_OR_RETURN(po.apply_device,
                           BenchApplyDevice(po.placement.dense, po.placement.apply));
  MEMPIPE_RETURN_IF_ERROR(ValidatePipelineOptions(po));

  PipelinePlacementResult out;
  PlacementResult& result = out.result;
  result.placement = absl::StrCat(pipeline.placement, "/", PipelineModeName(pipeline.mode));
  if (pipeline.mode == PipelineMode::kPipelined) {
    absl::StrAppend(&result.placement, "x", pipeline.micro_batches);
  }
  if (pipeline.reuse > 1) absl::StrAppend(&result.placement, "/reuse", pipeline.reuse);
  std::unique_ptr<PageSelector> selector;
  if (!po.placement.dense) {
    MEMPIPE_ASSIGN_OR_RETURN(selector, MakePageSelector(po.placement.selector()));
    result.selector = std::string(selector->Name());
  }
  if (po.apply_device) result.apply_device = std::string(po.apply_device->Name());
  std::vector<KvCacheView> caches;
  for (int l = 0; l < m.num_layers; ++l) caches.push_back(ctx.cache(l));
  MEMPIPE_ASSIGN_OR_RETURN(
      std::unique_ptr<DecodePipeline> pipe,
      DecodePipeline::Create(po, caches, m.num_heads, cfg.batch, std::move(selector)));

  ctx.Rewind();
  auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(pipe->Prefill(ctx.table()));
  result.bulk_prepare_ms = po.placement.dense ? 0 : MsSince(t0);

  const int batch = cfg.batch;
  const size_t esize = DTypeSize(cfg.dtype);
  const float scale = 1.0f / std::sqrt(static_cast<float>(m.head_dim));
  const size_t io_bytes = static_cast<size_t>(batch) * m.num_heads * m.head_dim * esize;
  std::vector<std::vector<uint8_t>> q(m.num_layers), k(m.num_layers), v(m.num_layers);
  std::vector<std::vector<uint8_t>> outs(m.num_layers, std::vector<uint8_t>(io_bytes));
  std::vector<uint8_t> ref(io_bytes);
  std::vector<int64_t> slots;
  double err_num = 0, err_den = 0;
  PipelineMetrics before;

  const int total = options.warmup + options.steps;
  for (int step = 0; step < total; ++step) {
    const bool timed = step >= options.warmup;
    const bool last = step == total - 1;
    if (step == options.warmup) pipe->ResetMetrics();
    before = pipe->Metrics();
    const std::vector<int32_t> lens = ctx.NextLens();
    BlockTableView table = ctx.table();
    table.seq_lens = lens.data();
    StepInputs in;
    in.table = table;
    // The model's K/V append for every layer (reshape_and_cache), then the pipeline.
    t0 = Clock::now();
    for (int l = 0; l < m.num_layers; ++l) {
      ctx.NextToken(step, l, q[l], k[l], v[l], slots);
      MEMPIPE_RETURN_IF_ERROR(WriteKv(ctx.cache(l), slots.data(), batch, k[l].data(), v[l].data()));
      in.new_keys.push_back(k[l].data());
      in.queries.push_back(q[l].data());
      in.outputs.push_back(outs[l].data());
    }
    in.new_slots = slots.data();
    const double append_ms = MsSince(t0);
    const auto s0 = Clock::now();
    MEMPIPE_RETURN_IF_ERROR(pipe->Step(in));
    const double step_ms = append_ms + MsSince(s0);
    const PipelineMetrics after = pipe->Metrics();

    if (last) {
      result.sparse_layers = 0;
      result.kv_bytes_per_step = 0;
      result.digest_bytes_per_step = 0;
      const double kv_row = 2.0 * m.head_dim * esize;
      for (int l = 0; l < m.num_layers; ++l) {
        absl::StatusOr<SelectionView> sel = pipe->LastSelection(l);
        for (int s = 0; s < batch; ++s) {
          for (int h = 0; h < m.num_kv_heads; ++h) {
            if (!sel.ok()) {  // a dense layer
              result.kv_bytes_per_step += kv_row * lens[s];
              continue;
            }
            result.digest_bytes_per_step +=
                NumPages(lens[s], cfg.block_size) * (options.digest_format == DigestFormat::kInt8
                                                         ? 2.0 * m.head_dim + sizeof(float)
                                                         : 2.0 * m.head_dim * esize);
            for (int i = 0; i < sel->Count(s, h); ++i) {
              result.kv_bytes_per_step +=
                  kv_row * std::min(cfg.block_size, lens[s] - sel->Row(s, h)[i] * cfg.block_size);
            }
          }
        }
        if (!sel.ok()) continue;
        ++result.sparse_layers;
        if (!options.check_accuracy) continue;
        const DecodeIo ref_io{q[l].data(), ref.data(), cfg.dtype,      batch,
                              m.num_heads, m.head_dim, options.threads};
        MEMPIPE_RETURN_IF_ERROR(DenseDecode(ref_io, ctx.cache(l), table, scale));
        for (size_t i = 0; i < static_cast<size_t>(batch) * m.num_heads * m.head_dim; ++i) {
          const double a = LoadAsFloat(outs[l].data(), cfg.dtype, i);
          const double b = LoadAsFloat(ref.data(), cfg.dtype, i);
          err_num += (a - b) * (a - b);
          err_den += b * b;
        }
      }
    }
    ctx.Advance();
    if (timed) {
      // Busy times per stage this step (they overlap in pipelined mode).
      result.mean.append_ms += append_ms / options.steps;
      result.mean.prepare_ms += (after.prepare.sum_ms() - before.prepare.sum_ms()) / options.steps;
      result.mean.relevancy_ms +=
          (after.selector_relevancy_ms - before.selector_relevancy_ms) / options.steps;
      result.mean.retrieval_ms +=
          (after.selector_retrieval_ms - before.selector_retrieval_ms) / options.steps;
      result.mean.apply_ms += (after.apply_busy_ms - before.apply_busy_ms) / options.steps;
      result.step_ms.push_back(step_ms);
    }
    if (progress) progress(step + 1, total, step_ms);
  }
  ctx.Rewind();
  out.metrics = pipe->Metrics();
  FinishPlacementResult(batch, options.check_accuracy, err_num, err_den, result);
  return out;
}

}  // namespace mempipe
