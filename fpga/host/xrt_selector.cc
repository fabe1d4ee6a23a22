#include "fpga/host/xrt_selector.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/clock.h"
#include "core/status_macros.h"
#include "experimental/xrt_xclbin.h"
#include "fpga/hls/kernels.h"
#include "fpga/host/xclbin_writer.h"

namespace mempipe {
namespace {

constexpr std::chrono::microseconds kPollInterval{50};

// Whole 4 KiB pages: XRT allocates host backing with aligned_alloc(4096, size), which requires
// a multiple of the alignment.
size_t PageRound(size_t bytes) { return (bytes + 4095) / 4096 * 4096; }

absl::Status XrtError(absl::string_view what, const std::exception& e) {
  return absl::InternalError(absl::StrCat("XRT ", what, ": ", e.what()));
}

// Kernel argument indices, from the single list in kernels.h.
int ArgIndex(absl::Span<const fpga_hls::KernelArg> args, absl::string_view name) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (name == args[i].name) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<XrtPageSelector>> XrtPageSelector::Open(const FpgaOptions& o) {
  std::unique_ptr<XrtPageSelector> sel(new XrtPageSelector());
  sel->num_cus_ = o.params.num_cus;
  sel->idle_io_.resize(sel->num_cus_);
  try {
    sel->device_ = xrt::device(o.device_index);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("XRT cannot open device ", o.device_index, ": ", e.what()));
  }
  std::vector<char> image;
  if (o.xclbin_path.empty()) {
    absl::StatusOr<std::vector<char>> written = WriteMempipeXclbin(sel->num_cus_);
    if (!written.ok()) return written.status();
    image = std::move(*written);
  }
  try {
    const xrt::xclbin xclbin =
        o.xclbin_path.empty() ? xrt::xclbin(image) : xrt::xclbin(o.xclbin_path);
    const xrt::uuid uuid = sel->device_.load_xclbin(xclbin);
    for (int cu = 0; cu < sel->num_cus_; ++cu) {
      sel->score_cus_.emplace_back(sel->device_, uuid,
                                   CuKernelSelector(fpga_hls::kScoreTopkName, cu));
      sel->update_cus_.emplace_back(sel->device_, uuid,
                                    CuKernelSelector(fpga_hls::kDigestUpdateName, cu));
    }
  } catch (const std::exception& e) {
    return XrtError(
        absl::StrCat("xclbin '", o.xclbin_path.empty() ? "<mempipe descriptive>" : o.xclbin_path,
                     "' with ", sel->num_cus_, " CUs per kernel"),
        e);
  }
  return sel;
}

XrtPageSelector::~XrtPageSelector() {
  // Buffers must outlive the runs that use them.
  for (auto* list : {&abandoned_}) {
    for (Pending& p : *list) {
      for (xrt::run& r : p.runs) {
        try {
          r.wait();
        } catch (const std::exception&) {
          // Nothing left to report to: the selector is going away.
        }
      }
    }
  }
  for (auto& [ticket, p] : pending_) {
    for (xrt::run& r : p.runs) {
      try {
        r.wait();
      } catch (const std::exception&) {
      }
    }
  }
}

absl::StatusOr<XrtPageSelector::Layer*> XrtPageSelector::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer ", layer, " was not added to the selector"));
  }
  return &it->second;
}

absl::Status XrtPageSelector::AddLayer(int layer, const CacheShape& shape) {
  if (layers_.count(layer)) {
    return absl::AlreadyExistsError(absl::StrCat("layer ", layer, " was already added"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));
  Layer l;
  l.shape = shape;
  const size_t bytes = PageRound(HeadSliceWords(shape) * hls_compat::kWordBytes);
  try {
    for (int h = 0; h < shape.num_kv_heads; ++h) {
      const xrt::kernel& k = score_cus_[CuFor(layer, h, shape.num_kv_heads, num_cus_)];
      xrt::bo bo(device_, bytes, xrt::bo::flags::normal, k.group_id(0));
      std::memset(bo.map<void*>(), 0, bytes);
      bo.sync(XCL_BO_SYNC_BO_TO_DEVICE);
      l.heads.push_back(std::move(bo));
    }
  } catch (const std::exception& e) {
    return XrtError(
        absl::StrCat("allocating layer ", layer, " digests (", bytes, " bytes per KV head)"), e);
  }
  layers_.emplace(layer, std::move(l));
  return absl::OkStatus();
}

XrtPageSelector::IoPair XrtPageSelector::TakeIo(int cu, size_t in_bytes, size_t out_bytes) {
  std::vector<IoPair>& idle = idle_io_[cu];
  for (size_t i = 0; i < idle.size(); ++i) {
    if (idle[i].in_bytes >= in_bytes && idle[i].out_bytes >= out_bytes) {
      IoPair pair = std::move(idle[i]);
      idle.erase(idle.begin() + i);
      return pair;
    }
  }
  IoPair pair;
  pair.in_bytes = PageRound(in_bytes);
  pair.out_bytes = out_bytes == 0 ? 0 : PageRound(out_bytes);
  const xrt::kernel& k = score_cus_[cu];  // every global argument of CU `cu` shares its bank
  pair.in = xrt::bo(device_, pair.in_bytes, xrt::bo::flags::normal, k.group_id(0));
  if (pair.out_bytes > 0) {
    pair.out = xrt::bo(device_, pair.out_bytes, xrt::bo::flags::normal, k.group_id(0));
  }
  ++io_pairs_allocated_;
  return pair;
}

void XrtPageSelector::ReturnIo(Pending& p) {
  for (size_t h = 0; h < p.bufs.size(); ++h) idle_io_[p.cus[h]].push_back(std::move(p.bufs[h]));
  p.bufs.clear();
}

void XrtPageSelector::Started(Pending& p, RunProbe::Kind kind, int layer, int kv_head, IoPair& io) {
  RunProbe probe;
  probe.kind = kind;
  probe.layer = layer;
  probe.kv_head = kv_head;
  probe.id = next_run_id_++;
  if (hooks_.started || hooks_.state) {  // host views only for the test hooks
    probe.in = io.in.map<uint8_t*>();
    probe.in_bytes = io.in_bytes;
    if (io.out_bytes > 0) {
      probe.out = io.out.map<uint8_t*>();
      probe.out_bytes = io.out_bytes;
    }
  }
  p.probes.push_back(probe);
  if (hooks_.started) hooks_.started(p.probes.back());
}

ert_cmd_state XrtPageSelector::Observed(const Pending& p, size_t i, ert_cmd_state xrt_state) const {
  return hooks_.state ? hooks_.state(p.probes[i], xrt_state) : xrt_state;
}

absl::StatusOr<int> XrtPageSelector::DigestBank(int layer, int kv_head) const {
  auto it = layers_.find(layer);
  if (it == layers_.end() || kv_head < 0 || kv_head >= it->second.shape.num_kv_heads) {
    return absl::NotFoundError(absl::StrCat("no digests for layer ", layer, " head ", kv_head));
  }
  try {
    return static_cast<int>(it->second.heads[kv_head].get_memory_group());
  } catch (const std::exception& e) {
    return XrtError("reading a buffer's memory group", e);
  }
}

absl::StatusOr<int> XrtPageSelector::ScoreCuBank(int cu, int arg) const {
  if (cu < 0 || cu >= num_cus_) {
    return absl::InvalidArgumentError(absl::StrCat("cu must be in [0, ", num_cus_, "), got ", cu));
  }
  try {
    return score_cus_[cu].group_id(arg);
  } catch (const std::exception& e) {
    return XrtError(absl::StrCat("group_id of argument ", arg), e);
  }
}

absl::Status XrtPageSelector::RunUpdate(int layer_id, Layer& layer, const int64_t* slots,
                                        int num_tokens, const void* keys) {
  const CacheShape& sh = layer.shape;
  const auto t0 = Clock::now();
  double transfer_ms = 0;
  static const auto& args = fpga_hls::kDigestUpdateArgs;
  // One launch's runs and buffers. On any error they go to `abandoned_` rather than being
  // destroyed: runs of other KV heads may still be in flight on those buffers.
  Pending launch;
  try {
    for (const auto& [begin, end] : SplitUpdateLaunches(slots, num_tokens, sh.block_size)) {
      const UpdateIo io = PlanUpdateIo(end - begin, sh);
      launch = Pending{};
      std::vector<xrt::run>& runs = launch.runs;
      for (int h = 0; h < sh.num_kv_heads; ++h) {
        const int cu = CuFor(layer_id, h, sh.num_kv_heads, num_cus_);
        IoPair pair = TakeIo(cu, io.in_bytes, 0);
        PackUpdateInputs(sh, slots, keys, begin, end, h, io, pair.in.map<uint8_t*>());
        const auto t1 = Clock::now();
        pair.in.sync(XCL_BO_SYNC_BO_TO_DEVICE, io.in_bytes, 0);
        transfer_ms += MsSince(t1);
        xrt::bo slots_bo(pair.in, std::max<size_t>(io.slots_bytes, 8), io.slots_offset);
        xrt::bo keys_bo(pair.in, std::max<size_t>(io.keys_bytes, 64), io.keys_offset);
        xrt::run run(update_cus_[cu]);
        run.set_arg(ArgIndex(args, "digests_in"), layer.heads[h]);
        run.set_arg(ArgIndex(args, "digests_out"), layer.heads[h]);
        run.set_arg(ArgIndex(args, "keys"), keys_bo);
        run.set_arg(ArgIndex(args, "slots"), slots_bo);
        run.set_arg(ArgIndex(args, "num_tokens"), end - begin);
        run.set_arg(ArgIndex(args, "num_kv_heads"), 1);
        run.set_arg(ArgIndex(args, "head"), 0);
        run.set_arg(ArgIndex(args, "head_dim"), sh.head_dim);
        run.set_arg(ArgIndex(args, "dtype"), DigestCode(sh));
        run.set_arg(ArgIndex(args, "block_size"), sh.block_size);
        run.start();
        launch.cus.push_back(cu);
        launch.bufs.push_back(std::move(pair));
        runs.push_back(std::move(run));
        Started(launch, RunProbe::Kind::kUpdate, layer_id, h, launch.bufs.back());
      }
      for (size_t i = 0; i < runs.size(); ++i) {
        const ert_cmd_state state = Observed(launch, i, runs[i].wait());
        if (state != ERT_CMD_STATE_COMPLETED) {
          abandoned_.push_back(std::move(launch));
          return absl::InternalError(
              absl::StrCat("digest update on layer ", layer_id, " ended in XRT state ", state));
        }
      }
      ReturnIo(launch);
      launch.runs.clear();
      launch.probes.clear();
    }
  } catch (const std::exception& e) {
    if (!launch.runs.empty() || !launch.bufs.empty()) abandoned_.push_back(std::move(launch));
    return XrtError(absl::StrCat("digest update on layer ", layer_id), e);
  }
  costs_ = SelectorCosts{};
  costs_.host_ms = costs_.prepare_ms = MsSince(t0);
  costs_.transfer_ms = transfer_ms;
  return absl::OkStatus();
}

absl::Status XrtPageSelector::BuildDigests(int layer, const KvCacheView& cache,
                                           const BlockTableView& table) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateBuildRequest(layer, cache, table, l->shape));
  std::vector<int64_t> slots;
  std::vector<uint8_t> keys;
  MEMPIPE_RETURN_IF_ERROR(GatherKeysForBuild(cache, table, slots, keys));
  return RunUpdate(layer, *l, slots.data(), static_cast<int>(slots.size()), keys.data());
}

absl::Status XrtPageSelector::AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                         const void* keys) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateAppend(l->shape, slots, num_tokens, keys));
  return RunUpdate(layer, *l, slots, num_tokens, keys);
}

absl::StatusOr<SelectTicket> XrtPageSelector::Submit(const SelectRequest& request) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(request.layer));
  MEMPIPE_RETURN_IF_ERROR(ValidateScoreRequest(request, l->shape));
  const CacheShape& sh = l->shape;
  static const auto& args = fpga_hls::kScoreTopkArgs;
  Pending p;
  p.submitted = Clock::now();
  p.layer = request.layer;
  p.request = request;
  const int group = request.query.num_heads / sh.num_kv_heads;
  p.io = PlanScoreIo(request.table.num_seqs, group, sh.head_dim, request.table.max_blocks_per_seq,
                     request.out.max_selected);
  const int k = request.config.PagesPerHead(sh.block_size);
  try {
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      const int cu = CuFor(request.layer, h, sh.num_kv_heads, num_cus_);
      xrt::kernel& kern = score_cus_[cu];
      p.cus.push_back(cu);
      p.bufs.push_back(TakeIo(cu, p.io.in_bytes, p.io.out_bytes));
      xrt::bo& in = p.bufs.back().in;
      xrt::bo& out = p.bufs.back().out;
      PackScoreInputs(request, h, group, p.io, in.map<uint8_t*>());
      const auto t1 = Clock::now();
      in.sync(XCL_BO_SYNC_BO_TO_DEVICE, p.io.in_bytes, 0);
      p.transfer_ms += MsSince(t1);
      xrt::run run(kern);
      run.set_arg(ArgIndex(args, "digests"), l->heads[h]);
      run.set_arg(ArgIndex(args, "queries"), xrt::bo(in, p.io.queries_bytes, p.io.queries_offset));
      run.set_arg(ArgIndex(args, "block_table"), xrt::bo(in, p.io.table_bytes, p.io.table_offset));
      run.set_arg(ArgIndex(args, "seq_lens"), xrt::bo(in, p.io.lens_bytes, p.io.lens_offset));
      run.set_arg(ArgIndex(args, "pages"), xrt::bo(out, p.io.pages_bytes, p.io.pages_offset));
      run.set_arg(ArgIndex(args, "counts"), xrt::bo(out, p.io.counts_bytes, p.io.counts_offset));
      run.set_arg(ArgIndex(args, "num_seqs"), request.table.num_seqs);
      run.set_arg(ArgIndex(args, "group"), group);
      run.set_arg(ArgIndex(args, "head_dim"), sh.head_dim);
      run.set_arg(ArgIndex(args, "dtype"), DigestCode(sh));
      run.set_arg(ArgIndex(args, "block_size"), sh.block_size);
      run.set_arg(ArgIndex(args, "max_blocks_per_seq"), request.table.max_blocks_per_seq);
      run.set_arg(ArgIndex(args, "max_selected"), request.out.max_selected);
      run.set_arg(ArgIndex(args, "k"), k);
      run.set_arg(ArgIndex(args, "sinks"), request.config.num_sink_pages);
      run.set_arg(ArgIndex(args, "locals"), request.config.num_local_pages);
      run.set_arg(ArgIndex(args, "aggregation"), static_cast<int>(request.config.aggregation));
      run.start();
      p.runs.push_back(std::move(run));
      Started(p, RunProbe::Kind::kScore, request.layer, h, p.bufs.back());
    }
  } catch (const std::exception& e) {
    // Runs already started keep their buffers until they finish.
    abandoned_.push_back(std::move(p));
    return XrtError(absl::StrCat("submitting layer ", request.layer), e);
  }
  const SelectTicket ticket = next_ticket_++;
  pending_.emplace(ticket, std::move(p));
  return ticket;
}

absl::Status XrtPageSelector::Wait(SelectTicket ticket, absl::Time deadline) {
  // Drop abandoned requests the card has finished with.
  // A run whose state cannot be read counts as still running: its buffers stay.
  const auto finished = [this](const Pending& p) {
    try {
      for (size_t i = 0; i < p.runs.size(); ++i) {
        const ert_cmd_state s = Observed(p, i, p.runs[i].state());
        if (s == ERT_CMD_STATE_NEW || s == ERT_CMD_STATE_QUEUED || s == ERT_CMD_STATE_RUNNING) {
          return false;
        }
      }
    } catch (const std::exception&) {
      return false;
    }
    return true;
  };
  abandoned_.erase(std::remove_if(abandoned_.begin(), abandoned_.end(), finished),
                   abandoned_.end());
  auto it = pending_.find(ticket);
  if (it == pending_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown or already waited ticket ", ticket));
  }
  Pending& p = it->second;
  try {
    for (size_t i = 0; i < p.runs.size(); ++i) {
      xrt::run& r = p.runs[i];
      ert_cmd_state state;
      if (deadline == absl::InfiniteFuture()) {
        state = Observed(p, i, r.wait());
      } else {
        // Poll the run's state rather than xrt::run::wait(timeout): the noop shim's wait spins
        // until some command completes and ignores the timeout, and polling costs a read of the
        // command buffer on a card too.
        while ((state = Observed(p, i, r.state())) == ERT_CMD_STATE_NEW ||
               state == ERT_CMD_STATE_QUEUED || state == ERT_CMD_STATE_RUNNING) {
          if (absl::Now() >= deadline) {
            const int layer = p.layer;
            abandoned_.push_back(std::move(p));
            pending_.erase(it);
            return absl::DeadlineExceededError(absl::StrCat("FPGA selection ", ticket, " (layer ",
                                                            layer, ") missed its deadline"));
          }
          std::this_thread::sleep_for(kPollInterval);
        }
        if (state == ERT_CMD_STATE_COMPLETED) {
          state = Observed(p, i, r.wait());  // let XRT retire the command
        }
      }
      if (state != ERT_CMD_STATE_COMPLETED) {
        // The other KV heads' runs may still be using their buffers (and this request's
        // output view): keep them alive until the card is done with them.
        const int layer = p.layer;
        abandoned_.push_back(std::move(p));
        pending_.erase(it);
        return absl::InternalError(
            absl::StrCat("score kernel for layer ", layer, " ended in XRT state ", state));
      }
    }
    const auto t1 = Clock::now();
    for (size_t h = 0; h < p.bufs.size(); ++h) {
      xrt::bo& out = p.bufs[h].out;
      out.sync(XCL_BO_SYNC_BO_FROM_DEVICE, p.io.out_bytes, 0);
      UnpackScoreOutputs(out.map<uint8_t*>(), p.io, static_cast<int>(h), p.request.out);
    }
    ReturnIo(p);
    costs_ = SelectorCosts{};
    costs_.transfer_ms = p.transfer_ms + MsSince(t1);
    costs_.host_ms = MsSince(p.submitted);
  } catch (const std::exception& e) {
    abandoned_.push_back(std::move(p));  // runs still in flight keep their buffers
    pending_.erase(it);
    return XrtError(absl::StrCat("waiting for ticket ", ticket), e);
  }
  pending_.erase(it);
  return absl::OkStatus();
}

}  // namespace mempipe
