#include "fpga/emulation/emulated_u55c.h"

#include <algorithm>
#include <cstring>
#include <exception>

#include "absl/strings/str_cat.h"
#include "core/clock.h"
#include "core/status_macros.h"
#include "fpga/hls/kernels.h"

namespace mempipe {
namespace {

using hls_compat::Word512;

std::vector<Word512> WordBuffer(size_t bytes) {
  return std::vector<Word512>((bytes + sizeof(Word512) - 1) / sizeof(Word512), Word512{});
}

uint8_t* Bytes(std::vector<Word512>& v) { return reinterpret_cast<uint8_t*>(v.data()); }

}  // namespace

absl::StatusOr<EmulatedFunctional> ParseEmulatedFunctional(absl::string_view name) {
  if (name == "hls") return EmulatedFunctional::kHls;
  if (name == "reference") return EmulatedFunctional::kReference;
  return absl::InvalidArgumentError(
      absl::StrCat("functional must be 'hls' or 'reference', got '", name, "'"));
}

absl::string_view EmulatedFunctionalName(EmulatedFunctional functional) {
  return functional == EmulatedFunctional::kReference ? "reference" : "hls";
}

EmulatedU55cSelector::EmulatedU55cSelector(const U55cParams& params, bool paced,
                                           EmulatedFunctional functional, int reference_threads)
    : model_(params),
      paced_(paced),
      functional_(functional),
      reference_(reference_threads),
      channel_bytes_(params.hbm_channels, 0.0),
      device_free_(Clock::now()),
      worker_(&EmulatedU55cSelector::WorkerLoop, this) {}

EmulatedU55cSelector::~EmulatedU55cSelector() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

absl::StatusOr<EmulatedU55cSelector::Layer*> EmulatedU55cSelector::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return &it->second;
}

int EmulatedU55cSelector::ChannelOf(int layer, int kv_head) const {
  auto it = layers_.find(layer);
  const int heads = it == layers_.end() ? 1 : it->second.shape.num_kv_heads;
  return CuFor(layer, kv_head, heads, model_.params().num_cus);
}

std::vector<double> EmulatedU55cSelector::ChannelBytes() const { return channel_bytes_; }

absl::Status EmulatedU55cSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  const double slice_bytes = static_cast<double>(HeadSliceWords(shape)) * sizeof(Word512);
  const int cus = model_.params().num_cus;
  for (int h = 0; h < shape.num_kv_heads; ++h) {
    const int ch = CuFor(layer, h, shape.num_kv_heads, cus);
    if (channel_bytes_[ch] + slice_bytes > model_.params().hbm_channel_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("layer ", layer, " KV head ", h, " needs ", slice_bytes,
                       " bytes of digests on HBM ", "pseudo-channel ", ch, ", which has ",
                       model_.params().hbm_channel_bytes - channel_bytes_[ch], " bytes left"));
    }
  }
  if (functional_ == EmulatedFunctional::kReference) {
    // The worker may still be finishing an abandoned request on the reference's layer map.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] {
      return queue_.empty() &&
             std::all_of(jobs_.begin(), jobs_.end(), [](const auto& j) { return j.second->done; });
    });
    MEMPIPE_RETURN_IF_ERROR(reference_.AddLayer(layer, shape));
  }
  Layer& l = layers_[layer];
  l.shape = shape;
  for (int h = 0; h < shape.num_kv_heads; ++h) {
    channel_bytes_[CuFor(layer, h, shape.num_kv_heads, cus)] += slice_bytes;
    // The reference keeps the digests itself; the model still books the HBM they take.
    if (functional_ == EmulatedFunctional::kHls) {
      l.heads.emplace_back(HeadSliceWords(shape), Word512{});
    }
  }
  return absl::OkStatus();
}

absl::Status EmulatedU55cSelector::RunUpdate(int layer_id, Layer& layer, const int64_t* slots,
                                             int num_tokens, const void* keys) {
  // The card's command queue is in order: a digest update follows every queued selection.
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] {
      return queue_.empty() &&
             std::all_of(jobs_.begin(), jobs_.end(), [](const auto& j) { return j.second->done; });
    });
  }
  const CacheShape& sh = layer.shape;
  const auto t0 = Clock::now();
  std::vector<double> to_card;
  std::vector<CuLaunch> launches;
  double kernel_s = 0, launch_s = 0, dma_s = 0, energy_j = 0;
  const bool hls = functional_ == EmulatedFunctional::kHls;
  if (!hls) MEMPIPE_RETURN_IF_ERROR(reference_.AppendKeys(layer_id, slots, num_tokens, keys));
  for (const auto& [begin, end] : SplitUpdateLaunches(slots, num_tokens, sh.block_size)) {
    const UpdateIo io = PlanUpdateIo(end - begin, sh);
    std::vector<Word512> in = WordBuffer(hls ? io.in_bytes : 0);
    to_card.clear();
    launches.clear();
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      if (!hls) {
        to_card.push_back(static_cast<double>(io.in_bytes));
        launches.push_back(
            UpdateLaunchWork(sh, slots, begin, end,
                             CuFor(layer_id, h, sh.num_kv_heads, model_.params().num_cus), io));
        continue;
      }
      PackUpdateInputs(sh, slots, keys, begin, end, h, io, Bytes(in));
      Word512* dg = layer.heads[h].data();
      try {
        mempipe_digest_update(dg, dg, reinterpret_cast<const Word512*>(Bytes(in) + io.keys_offset),
                              reinterpret_cast<const int64_t*>(Bytes(in) + io.slots_offset),
                              end - begin, /*num_kv_heads=*/1, /*head=*/0, sh.head_dim,
                              DigestCode(sh), sh.block_size);
      } catch (const std::exception& e) {
        return absl::InternalError(
            absl::StrCat("digest kernel failed in C simulation: ", e.what()));
      }
      const int cu = CuFor(layer_id, h, sh.num_kv_heads, model_.params().num_cus);
      to_card.push_back(static_cast<double>(io.in_bytes));
      launches.push_back(UpdateLaunchWork(sh, slots, begin, end, cu, io));
    }
    const CallEstimate e = model_.Call(to_card, launches, {});
    kernel_s += e.kernel_s;
    launch_s += e.launch_s;
    dma_s += e.to_card_s;
    energy_j += e.energy_j;
  }
  SelectorCosts c;
  c.host_ms = c.prepare_ms = MsBetween(t0, Clock::now());
  c.transfer_ms = dma_s * 1e3;
  c.modeled_device_ms = (kernel_s + launch_s + dma_s) * 1e3;
  c.modeled_energy_mj = energy_j * 1e3;
  Clock::time_point done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (paced_) {
      // The update occupies the card's queue for its modeled time too.
      device_free_ = std::max(device_free_, t0) +
                     std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double, std::milli>(*c.modeled_device_ms));
      done = device_free_;
    }
  }
  if (paced_) std::this_thread::sleep_until(done);
  c.host_ms = MsBetween(t0, Clock::now());
  std::lock_guard<std::mutex> lock(mu_);
  costs_ = c;
  return absl::OkStatus();
}

absl::Status EmulatedU55cSelector::BuildDigests(int layer, const KvCacheView& cache,
                                                const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateBuildRequest(layer, cache, table, l->shape));
  std::vector<int64_t> slots;
  std::vector<uint8_t> keys;
  MEMPIPE_RETURN_IF_ERROR(GatherKeysForBuild(cache, table, slots, keys));
  return RunUpdate(layer, *l, slots.data(), static_cast<int>(slots.size()), keys.data());
}

absl::Status EmulatedU55cSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                              const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateAppend(l->shape, slots, num_tokens, keys));
  return RunUpdate(layer, *l, slots, num_tokens, keys);
}

absl::StatusOr<SelectTicket> EmulatedU55cSelector::Submit(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(request.layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateScoreRequest(request, l->shape));
  const CacheShape& sh = l->shape;
  auto job = std::make_unique<Job>();
  job->submitted = Clock::now();
  job->ticket = next_ticket_++;
  job->layer = l;
  job->layer_id = request.layer;
  job->request = request;
  job->group = request.query.num_heads / sh.num_kv_heads;
  job->io = PlanScoreIo(request.table.num_seqs, job->group, sh.head_dim,
                        request.table.max_blocks_per_seq, request.out.max_selected);
  std::vector<double> to_card, from_card;
  std::vector<CuLaunch> launches;
  if (functional_ == EmulatedFunctional::kReference) {
    const QueryView& q = request.query;
    const size_t q_bytes =
        static_cast<size_t>(q.num_seqs) * q.num_heads * q.head_dim * DTypeSize(q.dtype);
    const auto* qb = static_cast<const uint8_t*>(q.data);
    job->ref_query.assign(qb, qb + q_bytes);
    const size_t t = static_cast<size_t>(request.table.num_seqs) * request.table.max_blocks_per_seq;
    job->ref_table.assign(request.table.block_table, request.table.block_table + t);
    job->ref_lens.assign(request.table.seq_lens, request.table.seq_lens + request.table.num_seqs);
    const size_t rows = static_cast<size_t>(request.out.num_seqs) * request.out.num_kv_heads;
    job->ref_pages.assign(rows * request.out.max_selected, -1);
    job->ref_counts.assign(rows, 0);
  }
  for (int h = 0; h < sh.num_kv_heads; ++h) {
    if (functional_ == EmulatedFunctional::kReference) {
      to_card.push_back(static_cast<double>(job->io.in_bytes));
      from_card.push_back(static_cast<double>(job->io.out_bytes));
      launches.push_back(ScoreLaunchWork(
          request, sh, CuFor(request.layer, h, sh.num_kv_heads, model_.params().num_cus), job->io,
          model_.params()));
      continue;
    }
    job->in.push_back(WordBuffer(job->io.in_bytes));
    job->out.push_back(WordBuffer(job->io.out_bytes));
    PackScoreInputs(request, h, job->group, job->io, Bytes(job->in.back()));
    to_card.push_back(static_cast<double>(job->io.in_bytes));
    from_card.push_back(static_cast<double>(job->io.out_bytes));
    launches.push_back(ScoreLaunchWork(
        request, sh, CuFor(request.layer, h, sh.num_kv_heads, model_.params().num_cus), job->io,
        model_.params()));
  }
  job->estimate = model_.Call(to_card, launches, from_card);
  const SelectTicket ticket = job->ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (paced_) {
      // In order behind the previous request, as on one command queue.
      device_free_ = std::max(device_free_, job->submitted) +
                     std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(job->estimate.total_s));
      job->completed = device_free_;
    }
    queue_.push_back(job.get());
    jobs_.emplace(ticket, std::move(job));
  }
  cv_.notify_all();
  return ticket;
}

void EmulatedU55cSelector::RunJob(Job& job) {
  const CacheShape& sh = job.layer->shape;
  const SelectRequest& r = job.request;
  const int k = r.config.PagesPerHead(sh.block_size);
  const auto t0 = Clock::now();
  if (functional_ == EmulatedFunctional::kReference) {
    SelectRequest ref = r;
    ref.query.data = job.ref_query.data();
    ref.table.block_table = job.ref_table.data();
    ref.table.seq_lens = job.ref_lens.data();
    ref.out.pages = job.ref_pages.data();
    ref.out.counts = job.ref_counts.data();
    absl::StatusOr<SelectTicket> t = reference_.Submit(ref);
    job.status = t.ok() ? reference_.Wait(*t, absl::InfiniteFuture()) : t.status();
    job.kernel_host_ms = MsBetween(t0, Clock::now());
    if (paced_) std::this_thread::sleep_until(job.completed);
    return;
  }
  try {
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      uint8_t* in = Bytes(job.in[h]);
      uint8_t* out = Bytes(job.out[h]);
      mempipe_score_topk(job.layer->heads[h].data(),
                         reinterpret_cast<const Word512*>(in + job.io.queries_offset),
                         reinterpret_cast<const int32_t*>(in + job.io.table_offset),
                         reinterpret_cast<const int32_t*>(in + job.io.lens_offset),
                         reinterpret_cast<int32_t*>(out + job.io.pages_offset),
                         reinterpret_cast<int32_t*>(out + job.io.counts_offset), r.table.num_seqs,
                         job.group, sh.head_dim, DigestCode(sh), sh.block_size,
                         r.table.max_blocks_per_seq, r.out.max_selected, k, r.config.num_sink_pages,
                         r.config.num_local_pages, static_cast<int>(r.config.aggregation));
    }
  } catch (const std::exception& e) {
    job.status =
        absl::InternalError(absl::StrCat("score kernel failed in C simulation: ", e.what()));
  }
  job.kernel_host_ms = MsBetween(t0, Clock::now());
  if (paced_) std::this_thread::sleep_until(job.completed);
}

void EmulatedU55cSelector::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Job* job = queue_.front();
    lock.unlock();
    RunJob(*job);
    lock.lock();
    queue_.pop_front();
    if (!paced_) job->completed = Clock::now();
    job->done = true;
    if (job->abandoned) jobs_.erase(job->ticket);
    cv_.notify_all();
  }
}

absl::Status EmulatedU55cSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = jobs_.find(ticket);
  if (it == jobs_.end() || it->second->abandoned) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  Job* job = it->second.get();
  const auto done = [&] { return job->done; };
  if (deadline == absl::InfiniteFuture()) {
    cv_.wait(lock, done);
  } else {
    const absl::Duration left = deadline - absl::Now();  // negative once it has passed
    const Clock::time_point give_up = Clock::now() + absl::ToChronoNanoseconds(left);
    // Paced: the result arrives at its modeled completion, so one due after the deadline missed
    // it even when the waiter only looks later (a waiter descheduled past both would otherwise
    // find it done and count a late card as on time).
    if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(std::max(left, absl::ZeroDuration())),
                      done) ||
        (paced_ && job->completed > give_up)) {
      const absl::Status late = absl::DeadlineExceededError(absl::StrCat(
          "FPGA selection ", ticket, " (layer ", job->layer_id, ") missed its deadline"));
      if (job->done) {
        jobs_.erase(it);  // finished: nothing left for the worker to drop
      } else {
        job->abandoned = true;  // the worker drops it when it finishes
      }
      return late;
    }
  }
  std::unique_ptr<Job> owned = std::move(it->second);
  jobs_.erase(it);
  if (owned->status.ok()) {
    if (functional_ == EmulatedFunctional::kReference) {
      const SelectionView& o = owned->request.out;
      std::copy(owned->ref_pages.begin(), owned->ref_pages.end(), o.pages);
      std::copy(owned->ref_counts.begin(), owned->ref_counts.end(), o.counts);
    }
    for (int h = 0; h < static_cast<int>(owned->out.size()); ++h) {
      UnpackScoreOutputs(Bytes(owned->out[h]), owned->io, h, owned->request.out);
    }
    SelectorCosts c;
    c.host_ms = MsBetween(owned->submitted, owned->completed);
    c.relevancy_ms = owned->kernel_host_ms;  // fused kernel: scoring and top-k together
    c.transfer_ms = (owned->estimate.to_card_s + owned->estimate.from_card_s) * 1e3;
    c.modeled_device_ms = owned->estimate.total_s * 1e3;
    c.modeled_energy_mj = owned->estimate.energy_j * 1e3;
    costs_ = c;
  }
  return owned->status;
}

SelectorCosts EmulatedU55cSelector::Costs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return costs_;
}

absl::Status EmulatedU55cSelector::ReadDigests(int layer, const DigestView& out) const {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  const CacheShape& sh = it->second.shape;
  if (out.data == nullptr || out.dtype != sh.dtype || out.num_blocks != sh.num_blocks ||
      out.num_kv_heads != sh.num_kv_heads || out.head_dim != sh.head_dim ||
      out.format != sh.digest_format ||
      (out.format == DigestFormat::kInt8 && (out.scales == nullptr || out.exact == nullptr))) {
    return absl::InvalidArgumentError("digest view does not match the layer's shape");
  }
  if (functional_ == EmulatedFunctional::kReference) {
    MEMPIPE_ASSIGN_OR_RETURN(DigestView ref, reference_.Digests(layer));
    std::memcpy(out.data, ref.data, ref.NumBytes());
    if (ref.format == DigestFormat::kInt8) {  // and the int8 digest's scales and exact rows
      std::memcpy(out.scales, ref.scales, ref.ScaleBytes());
      std::memcpy(out.exact, ref.exact, ref.ExactBytes());
    }
    return absl::OkStatus();
  }
  const size_t row = static_cast<size_t>(sh.head_dim) * DTypeSize(sh.dtype);
  const bool int8 = sh.digest_format == DigestFormat::kInt8;
  // Native: [block][max row, min row]. Int8: [block][max codes, min codes, scale word, exact
  // max row, exact min row] (fpga/hls/kernel_common.h).
  const size_t block_bytes = HeadSliceWords(sh) / sh.num_blocks * sizeof(Word512);
  const size_t codes = static_cast<size_t>(sh.head_dim);
  const size_t exact_at = int8 ? (2 * codes + sizeof(Word512)) : 0;
  void* exact_out = int8 ? out.exact : out.data;
  for (int h = 0; h < sh.num_kv_heads; ++h) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(it->second.heads[h].data());
    for (int b = 0; b < sh.num_blocks; ++b) {
      const uint8_t* blk = src + static_cast<size_t>(b) * block_bytes;
      for (int which = 0; which < 2; ++which) {
        std::memcpy(
            static_cast<uint8_t*>(exact_out) + out.Offset(b, which, h) * DTypeSize(sh.dtype),
            blk + exact_at + which * row, row);
        if (int8) {
          std::memcpy(static_cast<int8_t*>(out.data) + out.Offset(b, which, h), blk + which * codes,
                      codes);
        }
      }
      if (int8) std::memcpy(&out.scales[out.ScaleIndex(b, h)], blk + 2 * codes, sizeof(float));
    }
  }
  return absl::OkStatus();
}

}  // namespace mempipe
