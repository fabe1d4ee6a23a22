#include "integration/bench/decode_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "attention/decode.h"
#include "backend/selector_registry.h"
#include "core/clock.h"
#include "core/status_macros.h"
#include "integration/bench/selection_audit.h"

namespace mempipe {

void FinishPlacementResult(int batch, bool check_accuracy, double err_num, double err_den,
                           PlacementResult& result) {
  std::vector<double> sorted = result.step_ms;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  result.median_step_ms = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  result.tokens_per_s = batch * 1000.0 / result.median_step_ms;
  if (check_accuracy && result.sparse_layers > 0 && err_den > 0) {
    result.rel_l2_error = std::sqrt(err_num / err_den);
  }
}

absl::Status ValidateBenchOptions(const BenchOptions& options, const SyntheticContextConfig& cfg) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSparsityPolicy(options.policy, cfg.block_size));
  if (options.steps <= 0 || options.warmup < 0) {
    return absl::InvalidArgumentError(absl::StrCat("steps must be positive and warmup >= 0, got ",
                                                   options.steps, " and ", options.warmup));
  }
  if (options.steps + options.warmup > cfg.max_new_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps + warmup = ", options.steps + options.warmup,
                     " exceeds the context's room for new tokens (", cfg.max_new_tokens, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<ApplyDevice>> BenchApplyDevice(bool dense, Device apply) {
  const bool wants_gpu = apply == Device::kGpu || dense;
  if (!wants_gpu || !HasApplyDevice(Device::kGpu)) return std::shared_ptr<ApplyDevice>();
  MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<ApplyDevice> device, MakeApplyDevice(Device::kGpu));
  return std::shared_ptr<ApplyDevice>(std::move(device));
}

absl::StatusOr<PlacementResult> RunPlacement(SyntheticContext& ctx, const BenchOptions& options,
                                             absl::string_view placement,
                                             const ProgressFn& progress) {
  const SyntheticContextConfig& cfg = ctx.config();
  const ModelShape& m = cfg.shape;
  MEMPIPE_RETURN_IF_ERROR(ValidateBenchOptions(options, cfg));
  PlacementResult result;
  result.placement = std::string(placement);
  std::unique_ptr<PageSelector> selector;
  Device device = Device::kCpu;
  if (placement != "dense") {
    MEMPIPE_ASSIGN_OR_RETURN(device, ParseDevice(placement, "selector"));
    MEMPIPE_ASSIGN_OR_RETURN(selector, MakePageSelector(device));
    result.selector = std::string(selector->Name());
  }
  // Step 4: the selector's device (the GPU for placement gpu; the dense baseline on a GPU build)
  // or the host.
  MEMPIPE_ASSIGN_OR_RETURN(
      const std::shared_ptr<ApplyDevice> apply,
      BenchApplyDevice(placement == "dense", device == Device::kGpu ? Device::kGpu : Device::kCpu));
  if (apply) result.apply_device = std::string(apply->Name());
  ctx.Rewind();
  if (apply) {
    for (int l = 0; l < m.num_layers; ++l)
      MEMPIPE_RETURN_IF_ERROR(apply->AddLayer(l, ctx.cache(l)));
  }
  const int first_sparse_layer = FirstSparseLayer(options.policy, m.num_layers);
  if (selector) {
    const auto t0 = Clock::now();
    for (int l = first_sparse_layer; l < m.num_layers; ++l) {
      const KvCacheView c = ctx.cache(l);
      CacheShape shape{c.dtype, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
      shape.digest_format = options.digest_format;
      MEMPIPE_RETURN_IF_ERROR(selector->AddLayer(l, shape));
      MEMPIPE_RETURN_IF_ERROR(selector->BuildDigests(l, c, ctx.table()));
      if (auto modeled = selector->Costs().modeled_device_ms) {
        result.modeled_bulk_prepare_ms = result.modeled_bulk_prepare_ms.value_or(0) + *modeled;
      }
    }
    result.bulk_prepare_ms = MsSince(t0);
  }

  const int batch = cfg.batch;
  const int k_pages = options.policy.selection.PagesPerHead(cfg.block_size);
  const size_t esize = DTypeSize(cfg.dtype);
  const float scale = 1.0f / std::sqrt(static_cast<float>(m.head_dim));
  std::vector<uint8_t> q, k, v;
  std::vector<int64_t> slots;
  std::vector<uint8_t> out(static_cast<size_t>(batch) * m.num_heads * m.head_dim * esize);
  std::vector<uint8_t> ref(out.size());
  std::vector<int32_t> pages(static_cast<size_t>(batch) * m.num_kv_heads * k_pages);
  std::vector<int32_t> counts(static_cast<size_t>(batch) * m.num_kv_heads);
  double err_num = 0, err_den = 0;
  SelectionAudit audit;
  std::vector<uint8_t> audit_scratch;
  result.digest_format = std::string(DigestFormatName(options.digest_format));
  // Recall of int8 selections against native ones (last step): a native digest of one layer at a
  // time, rebuilt from the cache, and its selection.
  const bool measure_recall =
      selector && options.check_accuracy && options.digest_format == DigestFormat::kInt8;
  std::vector<uint8_t> native_digest;
  std::vector<int32_t> native_pages(pages.size()), native_counts(counts.size());
  double recall_hit = 0, recall_total = 0;

  const int total = options.warmup + options.steps;
  double modeled_ms = 0, modeled_mj = 0;  // over timed steps
  bool modeled = false;
  for (int step = 0; step < total; ++step) {
    const bool timed = step >= options.warmup;
    auto add_modeled = [&](const SelectorCosts& costs) {
      if (!timed || !costs.modeled_device_ms) return;
      modeled = true;
      modeled_ms += *costs.modeled_device_ms;
      modeled_mj += costs.modeled_energy_mj.value_or(0);
    };
    const bool last = step == total - 1;
    StepBreakdown t;
    const std::vector<int32_t> lens = ctx.NextLens();
    BlockTableView table = ctx.table();
    table.seq_lens = lens.data();
    if (last)
      result.sparse_layers = 0, result.kv_bytes_per_step = 0, result.digest_bytes_per_step = 0;
    for (int l = 0; l < m.num_layers; ++l) {
      const KvCacheView cache = ctx.cache(l);
      ctx.NextToken(step, l, q, k, v, slots);
      auto t0 = Clock::now();
      MEMPIPE_RETURN_IF_ERROR(WriteKv(cache, slots.data(), batch, k.data(), v.data()));
      if (apply) MEMPIPE_RETURN_IF_ERROR(apply->SyncTokens(l, slots.data(), batch));
      t.append_ms += MsSince(t0);
      if (selector && l >= first_sparse_layer) {
        t0 = Clock::now();
        MEMPIPE_RETURN_IF_ERROR(selector->AppendKeys(l, slots.data(), batch, k.data()));
        t.prepare_ms += MsSince(t0);
        add_modeled(selector->Costs());
      }
      const DecodeIo io{q.data(),    out.data(), cfg.dtype,      batch,
                        m.num_heads, m.head_dim, options.threads};
      const bool sparse = selector && DecodesSparse(options.policy, l, lens.data(), batch);
      if (sparse) {
        const SelectionView sel{pages.data(), counts.data(), batch, m.num_kv_heads, k_pages};
        const ThreadsCpu select_cpu0 = ThreadsCpu::Now();
        const auto select_begin = Clock::now();
        MEMPIPE_ASSIGN_OR_RETURN(
            SelectTicket ticket,
            selector->Submit(
                SelectRequest{l, QueryView{q.data(), cfg.dtype, batch, m.num_heads, m.head_dim},
                              table, options.policy.selection, sel}));
        MEMPIPE_RETURN_IF_ERROR(selector->Wait(ticket, absl::InfiniteFuture()));
        const double select_wall_ms = MsSince(select_begin);
        t.select_cpu_ms += ThreadsCpu::Now().MsSince(select_cpu0);
        const SelectorCosts costs = selector->Costs();
        if (costs.relevancy_ms == 0 && costs.retrieval_ms == 0) {
          // A selector that fuses steps 2 and 3 on its device (gpu) reports no split: its
          // measured Submit-to-Wait wall time goes under relevancy, so the total counts it.
          t.relevancy_ms += select_wall_ms;
        } else {
          t.relevancy_ms += costs.relevancy_ms;
          t.retrieval_ms += costs.retrieval_ms;
        }
        add_modeled(costs);
        const ThreadsCpu c0 = ThreadsCpu::Now();
        t0 = Clock::now();
        const PageList page_list{pages.data(), counts.data(), m.num_kv_heads, k_pages};
        MEMPIPE_RETURN_IF_ERROR(apply ? apply->Decode(l, io, table, &page_list, scale)
                                      : SparseDecode(io, cache, table, page_list, scale));
        t.apply_ms += MsSince(t0);
        t.apply_cpu_ms += ThreadsCpu::Now().MsSince(c0);
      } else {
        const ThreadsCpu c0 = ThreadsCpu::Now();
        t0 = Clock::now();
        MEMPIPE_RETURN_IF_ERROR(apply ? apply->Decode(l, io, table, nullptr, scale)
                                      : DenseDecode(io, cache, table, scale));
        t.apply_ms += MsSince(t0);
        t.apply_cpu_ms += ThreadsCpu::Now().MsSince(c0);
      }
      if (!last) continue;
      // Bytes attention and scoring touched on the last step.
      const double kv_row = 2.0 * m.head_dim * esize;  // K and V of one token, one KV head
      for (int s = 0; s < batch; ++s) {
        const int n_pages = NumPages(lens[s], cfg.block_size);
        for (int h = 0; h < m.num_kv_heads; ++h) {
          if (!sparse) {
            result.kv_bytes_per_step += kv_row * lens[s];
            continue;
          }
          result.digest_bytes_per_step += n_pages * (options.digest_format == DigestFormat::kInt8
                                                         ? 2.0 * m.head_dim + sizeof(float)
                                                         : 2.0 * m.head_dim * esize);
          const int32_t* row = &pages[(static_cast<size_t>(s) * m.num_kv_heads + h) * k_pages];
          for (int i = 0; i < counts[static_cast<size_t>(s) * m.num_kv_heads + h]; ++i) {
            result.kv_bytes_per_step +=
                kv_row * std::min(cfg.block_size, lens[s] - row[i] * cfg.block_size);
          }
        }
      }
      if (sparse && measure_recall) {
        DigestView nd{nullptr, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
        native_digest.resize(nd.NumBytes());
        nd.data = native_digest.data();
        MEMPIPE_RETURN_IF_ERROR(BuildDigests(cache, table, nd));
        const SelectionView nsel{native_pages.data(), native_counts.data(), batch, m.num_kv_heads,
                                 k_pages};
        MEMPIPE_RETURN_IF_ERROR(
            ScoreAndSelect(QueryView{q.data(), cfg.dtype, batch, m.num_heads, m.head_dim}, cache,
                           nd, table, options.policy.selection, nsel));
        const SelectionConfig& sc = options.policy.selection;
        for (int s = 0; s < batch; ++s) {
          const int n = NumPages(lens[s], cfg.block_size);
          for (int h = 0; h < m.num_kv_heads; ++h) {
            const size_t r = static_cast<size_t>(s) * m.num_kv_heads + h;
            const int32_t* got = &pages[r * k_pages];
            const int32_t* want = &native_pages[r * k_pages];
            for (int i = 0; i < native_counts[r]; ++i) {
              const int p = want[i];
              if (n <= k_pages || p < sc.num_sink_pages || p >= n - sc.num_local_pages) continue;
              ++recall_total;
              recall_hit += std::binary_search(got, got + counts[r], p) ? 1 : 0;
            }
          }
        }
      }
      if (sparse) {
        ++result.sparse_layers;
        if (options.check_accuracy) {
          const SelectionView sel{pages.data(), counts.data(), batch, m.num_kv_heads, k_pages};
          MEMPIPE_RETURN_IF_ERROR(AuditSelection(
              QueryView{q.data(), cfg.dtype, batch, m.num_heads, m.head_dim}, cache, table,
              options.policy.selection, sel, options.digest_format, audit_scratch, audit));
          const DecodeIo ref_io{q.data(),    ref.data(), cfg.dtype,      batch,
                                m.num_heads, m.head_dim, options.threads};
          MEMPIPE_RETURN_IF_ERROR(DenseDecode(ref_io, cache, table, scale));
          for (size_t i = 0; i < static_cast<size_t>(batch) * m.num_heads * m.head_dim; ++i) {
            const double a = LoadAsFloat(out.data(), cfg.dtype, i);
            const double b = LoadAsFloat(ref.data(), cfg.dtype, i);
            err_num += (a - b) * (a - b);
            err_den += b * b;
          }
        }
      }
    }
    ctx.Advance();
    if (timed) {
      result.mean.append_ms += t.append_ms / options.steps;
      result.mean.prepare_ms += t.prepare_ms / options.steps;
      result.mean.relevancy_ms += t.relevancy_ms / options.steps;
      result.mean.retrieval_ms += t.retrieval_ms / options.steps;
      result.mean.apply_ms += t.apply_ms / options.steps;
      result.mean.apply_cpu_ms += t.apply_cpu_ms / options.steps;
      result.mean.select_cpu_ms += t.select_cpu_ms / options.steps;
      result.step_ms.push_back(t.Total());
    }
    if (progress) progress(step + 1, total, t.Total());
  }
  ctx.Rewind();
  if (modeled) {
    result.modeled_device_ms_per_step = modeled_ms / options.steps;
    result.modeled_energy_mj_per_step = modeled_mj / options.steps;
  }
  if (options.check_accuracy && result.sparse_layers > 0) {
    result.recall_vs_flat = audit.Recall();
    result.digest_rows_per_step = audit.digest_rows;
    result.flat_digest_rows_per_step = audit.flat_digest_rows;
    // What the selection's config scans: a hierarchical one fewer rows than every page.
    DigestView row_format{nullptr, cfg.dtype, 1, 1, m.head_dim};
    row_format.format = options.digest_format;
    result.digest_bytes_per_step =
        audit.digest_rows * static_cast<double>(row_format.ScannedBytesPerPageHead());
  }
  if (measure_recall && recall_total > 0) result.digest_recall = recall_hit / recall_total;
  FinishPlacementResult(batch, options.check_accuracy, err_num, err_den, result);
  return result;
}

}  // namespace mempipe
