#include "fpga/emulation/hierarchical_u55c.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "fpga/device_layout.h"
#include "fpga/hls/hls_compat.h"
#include "fpga/request_checks.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {
namespace {

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// A request whose sequence s has rows[s] "pages" and whose selection rows hold `emitted`
// entries: what ScoreLaunchWork needs to price one pass of the score kernel over `rows` digest
// row pairs.
CuLaunch PassWork(const SelectRequest& r, const CacheShape& shape, int cu,
                  const std::vector<int32_t>& rows, int emitted, const ScoreIo& io,
                  const U55cParams& params) {
  std::vector<int32_t> lens(rows.size());
  for (size_t s = 0; s < rows.size(); ++s) lens[s] = rows[s] * shape.block_size;
  SelectRequest pass = r;
  pass.table.seq_lens = lens.data();
  pass.out.max_selected = emitted;
  return ScoreLaunchWork(pass, shape, cu, io, params);
}

}  // namespace

HierarchicalU55cSelector::HierarchicalU55cSelector(const U55cParams& params, bool paced,
                                                   int pages_per_super_page)
    : model_(params),
      paced_(paced),
      f_(pages_per_super_page),
      name_(absl::StrCat("fpga-u55c-emulated(super-pages of ", pages_per_super_page,
                         " pages, reference functional)")),
      channel_bytes_(params.hbm_channels, 0.0),
      device_free_(Clock::now()) {}

DigestView HierarchicalU55cSelector::Layer::PageView() {
  DigestView v{pages.data(), shape.dtype, shape.num_blocks, shape.num_kv_heads, shape.head_dim};
  v.format = shape.digest_format;
  if (v.format == DigestFormat::kInt8) {
    v.scales = scales.data();
    v.exact = exact.data();
  }
  return v;
}

absl::StatusOr<HierarchicalU55cSelector::Layer*> HierarchicalU55cSelector::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return &it->second;
}

absl::StatusOr<DigestView> HierarchicalU55cSelector::PageDigests(int layer) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  return l->PageView();
}

absl::StatusOr<DigestView> HierarchicalU55cSelector::SuperDigests(int layer) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  return l->super.view();
}

HierarchyStats HierarchicalU55cSelector::LastStats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

SelectorCosts HierarchicalU55cSelector::Costs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return costs_;
}

absl::Status HierarchicalU55cSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  if (f_ != 2 && f_ != 4 && f_ != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages per super-page must be 2, 4 or 8, got ", f_));
  }
  // Each head's page slice and super slice share its pseudo-channel.
  const double block_bytes =
      static_cast<double>(HeadSliceWords(shape)) * hls_compat::kWordBytes / shape.num_blocks;
  const double slice = block_bytes * (shape.num_blocks + NumSuperBlocks(shape.num_blocks, f_));
  const int cus = model_.params().num_cus;
  std::vector<double> need(channel_bytes_.size(), 0.0);
  for (int h = 0; h < shape.num_kv_heads; ++h) {
    const int ch = CuFor(layer, h, shape.num_kv_heads, cus);
    need[ch] += slice;
    if (channel_bytes_[ch] + need[ch] > model_.params().hbm_channel_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "layer ", layer, " KV head ", h, " needs ", slice,
          " bytes of page and super-page digests on HBM pseudo-channel ", ch, ", which has ",
          model_.params().hbm_channel_bytes - channel_bytes_[ch] - need[ch] + slice,
          " bytes left"));
    }
  }
  for (size_t ch = 0; ch < need.size(); ++ch) channel_bytes_[ch] += need[ch];
  Layer& l = layers_[layer];
  l.shape = shape;
  const DigestView v = l.PageView();
  l.pages.assign(v.NumBytes(), 0);
  l.scales.assign(v.ScaleBytes() / sizeof(float), 0.0f);
  l.exact.assign(v.ExactBytes(), 0);
  l.super = SuperDigestBuffers(l.PageView(), f_);
  return absl::OkStatus();
}

void HierarchicalU55cSelector::FinishUpdate(int layer_id, const Layer& layer, const int64_t* slots,
                                            int num_tokens, Clock::time_point t0) {
  const CacheShape& sh = layer.shape;
  const double row_bytes = static_cast<double>(RowWordsOf(sh)) * hls_compat::kWordBytes;
  double kernel_s = 0, launch_s = 0, dma_s = 0, energy_j = 0;
  for (const auto& [begin, end] : SplitUpdateLaunches(slots, num_tokens, sh.block_size)) {
    const UpdateIo io = PlanUpdateIo(end - begin, sh);
    // Runs of tokens in one page: each also reads and writes its super row pair.
    double runs = 0;
    int64_t current = -1;
    for (int t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      if (slots[t] / sh.block_size != current) ++runs, current = slots[t] / sh.block_size;
    }
    std::vector<double> to_card;
    std::vector<CuLaunch> launches;
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      const int cu = CuFor(layer_id, h, sh.num_kv_heads, model_.params().num_cus);
      CuLaunch l = UpdateLaunchWork(sh, slots, begin, end, cu, io);
      l.hbm_bytes += 2 * 2 * row_bytes * runs;
      to_card.push_back(static_cast<double>(io.in_bytes));
      launches.push_back(l);
    }
    const CallEstimate e = model_.Call(to_card, launches, {});
    kernel_s += e.kernel_s;
    launch_s += e.launch_s;
    dma_s += e.to_card_s;
    energy_j += e.energy_j;
  }
  SelectorCosts c;
  c.prepare_ms = MsSince(t0);
  c.transfer_ms = dma_s * 1e3;
  c.modeled_device_ms = (kernel_s + launch_s + dma_s) * 1e3;
  c.modeled_energy_mj = energy_j * 1e3;
  if (paced_) {
    // In order behind every queued request, as on one command queue.
    device_free_ = std::max(device_free_, t0) + Seconds(kernel_s + launch_s + dma_s);
    std::this_thread::sleep_until(device_free_);
  }
  c.host_ms = MsSince(t0);
  std::lock_guard<std::mutex> lock(mu_);
  costs_ = c;
}

absl::Status HierarchicalU55cSelector::BuildDigests(int layer, const KvCacheView& cache,
                                                    const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateBuildRequest(layer, cache, table, l->shape));
  MEMPIPE_RETURN_IF_ERROR(ValidateSuperPageTable(table, cache.block_size, f_));
  const auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(mempipe::BuildDigests(cache, table, l->PageView()));
  MEMPIPE_RETURN_IF_ERROR(
      BuildSuperDigests(l->PageView(), table, cache.block_size, f_, l->super.view()));
  // Priced as the bulk build through the update kernel (EmulatedU55cSelector does the same):
  // every token of every page, page by page.
  std::vector<int64_t> slots;
  for (int s = 0; s < table.num_seqs; ++s) {
    const int len = table.seq_lens[s];
    for (int p = 0; p < NumPages(len, cache.block_size); ++p) {
      const int n = std::min(cache.block_size, len - p * cache.block_size);
      for (int t = 0; t < n; ++t) {
        slots.push_back(static_cast<int64_t>(table.Block(s, p)) * cache.block_size + t);
      }
    }
  }
  FinishUpdate(layer, *l, slots.data(), static_cast<int>(slots.size()), t0);
  return absl::OkStatus();
}

absl::Status HierarchicalU55cSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                                  const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateAppend(l->shape, slots, num_tokens, keys));
  const auto t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(UpdateHierarchicalDigests(
      l->PageView(), l->super.view(), l->shape.block_size, f_, slots, num_tokens, keys));
  FinishUpdate(layer, *l, slots, num_tokens, t0);
  return absl::OkStatus();
}

absl::StatusOr<SelectTicket> HierarchicalU55cSelector::Submit(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(request.layer));
  const CacheShape& sh = l->shape;
  const bool hier = !request.config.hierarchy.Flat();
  if (hier && request.config.hierarchy.pages_per_super_page != f_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the request asks for super-pages of ", request.config.hierarchy.pages_per_super_page,
        " pages; this card keeps super-page digests of ", f_, " pages"));
  }
  {
    SelectRequest flat = request;  // the kernel's own checks, hierarchy aside
    flat.config.hierarchy = PageHierarchy{};
    MEMPIPE_RETURN_IF_ERROR(ValidateScoreRequest(flat, sh));
  }
  if (hier) MEMPIPE_RETURN_IF_ERROR(ValidateSuperPageTable(request.table, sh.block_size, f_));
  auto job = std::make_unique<Job>();
  job->submitted = Clock::now();
  const int seqs = request.table.num_seqs, heads = sh.num_kv_heads;
  job->pages.assign(static_cast<size_t>(seqs) * heads * request.out.max_selected, -1);
  job->counts.assign(static_cast<size_t>(seqs) * heads, 0);
  job->out =
      SelectionView{job->pages.data(), job->counts.data(), seqs, heads, request.out.max_selected};
  job->caller_out = request.out;
  const KvCacheView geometry = sh.Geometry();
  std::vector<HierarchyStats> rows;
  if (hier) {
    job->status =
        SelectHierarchical(request.query, geometry, l->PageView(), l->super.view(), request.table,
                           request.config, job->out, &job->stats, 1, &rows);
  } else {
    job->status = ScoreAndSelect(request.query, geometry, l->PageView(), request.table,
                                 request.config, job->out);
  }
  job->functional_ms = MsSince(job->submitted);
  // Price it.
  const int group = request.query.num_heads / heads;
  const ScoreIo io = PlanScoreIo(seqs, group, sh.head_dim, request.table.max_blocks_per_seq,
                                 request.out.max_selected);
  std::vector<double> to_card, from_card;
  std::vector<CuLaunch> launches;
  const U55cParams& p = model_.params();
  for (int h = 0; h < heads && job->status.ok(); ++h) {  // a failed request costs nothing
    const int cu = CuFor(request.layer, h, heads, p.num_cus);
    to_card.push_back(static_cast<double>(io.in_bytes));
    from_card.push_back(static_cast<double>(io.out_bytes));
    if (!hier) {
      launches.push_back(ScoreLaunchWork(request, sh, cu, io, p));
      continue;
    }
    std::vector<int32_t> super_rows(seqs), page_rows(seqs);
    int kept = 0;
    for (int s = 0; s < seqs; ++s) {
      const HierarchyStats& st = rows[static_cast<size_t>(s) * heads + h];
      super_rows[s] = static_cast<int32_t>(st.super_rows_scored);
      page_rows[s] = static_cast<int32_t>(st.page_rows_scored);
      kept = std::max(kept, static_cast<int>(st.kept_super_pages));
    }
    // Pass 1 reads the queries, table and lengths; pass 2 the table again and writes the rows.
    ScoreIo pass1 = io, pass2 = io;
    pass1.pages_bytes = static_cast<size_t>(seqs) * kept * sizeof(int32_t);
    pass1.counts_bytes = 0;
    pass2.queries_bytes = 0;
    pass2.lens_bytes = 0;
    launches.push_back(PassWork(request, sh, cu, super_rows, kept, pass1, p));
    launches.push_back(PassWork(request, sh, cu, page_rows, request.out.max_selected, pass2, p));
  }
  job->estimate = model_.Call(to_card, launches, from_card);
  if (paced_) {
    device_free_ = std::max(device_free_, job->submitted) + Seconds(job->estimate.total_s);
    job->completed = device_free_;
  } else {
    job->completed = Clock::now();
  }
  const SelectTicket ticket = next_ticket_++;
  jobs_.emplace(ticket, std::move(job));
  return ticket;
}

absl::Status HierarchicalU55cSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  auto it = jobs_.find(ticket);
  if (it == jobs_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  std::unique_ptr<Job> job = std::move(it->second);
  jobs_.erase(it);
  if (paced_) {
    // The deadline on the steady clock, in the past if it has passed: a result due after it is
    // late even when the waiter only looks later.
    const absl::Duration left = deadline - absl::Now();
    const Clock::time_point give_up = deadline == absl::InfiniteFuture()
                                          ? Clock::time_point::max()
                                          : Clock::now() + absl::ToChronoNanoseconds(left);
    if (job->completed > give_up) {
      std::this_thread::sleep_until(give_up);
      return absl::DeadlineExceededError(
          absl::StrCat("FPGA selection ", ticket, " missed its deadline"));
    }
    std::this_thread::sleep_until(job->completed);
  }
  if (!job->status.ok()) return job->status;
  const SelectionView& dst = job->caller_out;
  for (int s = 0; s < dst.num_seqs; ++s) {
    for (int h = 0; h < dst.num_kv_heads; ++h) {
      std::memcpy(dst.Row(s, h), job->out.Row(s, h), dst.max_selected * sizeof(int32_t));
      dst.Count(s, h) = job->out.Count(s, h);
    }
  }
  SelectorCosts c;
  c.host_ms = MsSince(job->submitted);
  c.relevancy_ms = job->functional_ms;  // the reference scores and selects together
  c.transfer_ms = (job->estimate.to_card_s + job->estimate.from_card_s) * 1e3;
  c.modeled_device_ms = job->estimate.total_s * 1e3;
  c.modeled_energy_mj = job->estimate.energy_j * 1e3;
  std::lock_guard<std::mutex> lock(mu_);
  costs_ = c;
  stats_ = job->stats;
  return absl::OkStatus();
}

}  // namespace mempipe
