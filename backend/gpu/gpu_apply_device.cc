#include "backend/gpu/gpu_apply_device.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "attention/gpu/paged_decode_gpu.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

// Sections of the packed input transfer start 16-byte aligned (the kernels' vector loads).
size_t Align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

}  // namespace

absl::StatusOr<std::unique_ptr<GpuApplyDevice>> GpuApplyDevice::Create() {
  if (GpuDeviceCount() == 0) return absl::UnavailableError("GpuApplyDevice: no GPU present");
  std::unique_ptr<GpuApplyDevice> d(new GpuApplyDevice());
  MEMPIPE_ASSIGN_OR_RETURN(d->stream_, GpuStreamOwner::Create());
  MEMPIPE_ASSIGN_OR_RETURN(d->done_, GpuEventOwner::Create());
  return d;
}

KvCacheView GpuApplyDevice::Layer::DeviceView() const {
  KvCacheView v = host;
  v.data = cache.data();
  return v;
}

absl::StatusOr<GpuApplyDevice::Layer*> GpuApplyDevice::Find(int layer) {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GpuApplyDevice: layer ", layer, " was not added (AddLayer)"));
  }
  return &it->second;
}

absl::Status GpuApplyDevice::Reserve(DeviceBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes) return absl::OkStatus();
  MEMPIPE_ASSIGN_OR_RETURN(buf, DeviceBuffer::Allocate(bytes));
  return absl::OkStatus();
}

absl::Status GpuApplyDevice::Reserve(PinnedHostBuffer& buf, size_t bytes) {
  if (buf.size() >= bytes) return absl::OkStatus();
  MEMPIPE_ASSIGN_OR_RETURN(buf, PinnedHostBuffer::Allocate(bytes));
  return absl::OkStatus();
}

absl::Status GpuApplyDevice::AddLayer(int layer, const KvCacheView& host_cache) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(host_cache));
  MEMPIPE_RETURN_IF_ERROR(RequireTokenMajor(host_cache, "GpuApplyDevice"));
  if (layer < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GpuApplyDevice: layer must be >= 0, got ", layer));
  }
  Layer& l = layers_[layer];
  // The previous copy (if any) may still be read by queued work: wait before replacing it.
  MEMPIPE_RETURN_IF_ERROR(stream_.Synchronize());
  l.host = host_cache;
  MEMPIPE_RETURN_IF_ERROR(Reserve(l.cache, host_cache.NumBytes()));
  return l.cache.CopyFromHost(host_cache.data, host_cache.NumBytes());
}

absl::Status GpuApplyDevice::SyncTokens(int layer, const int64_t* slots, int num_tokens) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  if (num_tokens < 0 || (num_tokens > 0 && slots == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GpuApplyDevice::SyncTokens: need num_tokens >= 0 slots, got ", num_tokens,
                     slots == nullptr ? " and no slots" : ""));
  }
  const KvCacheView& c = l->host;
  const int64_t num_slots = static_cast<int64_t>(c.num_blocks) * c.block_size;
  const size_t row = c.TokenStride() * DTypeSize(c.dtype);
  const size_t plane = c.PlaneElems() * DTypeSize(c.dtype);
  const auto* host = static_cast<const uint8_t*>(c.data);
  auto* dev = static_cast<uint8_t*>(l->cache.data());
  for (int i = 0; i < num_tokens; ++i) {
    const int64_t s = slots[i];
    if (s < 0) continue;
    if (s >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("GpuApplyDevice::SyncTokens: slots[", i,
                                                     "] = ", s, " is past the cache (", num_slots,
                                                     " slots)"));
    }
    for (size_t p : {size_t{0}, plane}) {  // K, then V
      MEMPIPE_RETURN_IF_ERROR(
          CopyToDeviceAsync(dev + p + s * row, host + p + s * row, row, stream_.get()));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuApplyDevice::Decode(int layer, const DecodeIo& io, const BlockTableView& table,
                                    const PageList* pages, float scale) {
  MEMPIPE_ASSIGN_OR_RETURN(Layer * l, Find(layer));
  const KvCacheView& c = l->host;
  // The CPU decode's own checks, on the host inputs (the kernels cannot check device indices).
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, c.block_size, c.num_blocks));
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, c, table));
  if (pages != nullptr) MEMPIPE_RETURN_IF_ERROR(ValidatePageList(*pages, table, c));

  const int n = table.num_seqs;
  const size_t q_bytes = static_cast<size_t>(n) * io.num_heads * io.head_dim * DTypeSize(io.dtype);
  const size_t bt_bytes = static_cast<size_t>(n) * table.max_blocks_per_seq * sizeof(int32_t);
  const size_t len_bytes = static_cast<size_t>(n) * sizeof(int32_t);
  const size_t sel_rows = pages ? static_cast<size_t>(n) * pages->num_kv_heads : 0;
  const size_t pg_bytes = pages ? sel_rows * pages->max_selected * sizeof(int32_t) : 0;
  const size_t cnt_bytes = sel_rows * sizeof(int32_t);
  const size_t off_bt = Align16(q_bytes);
  const size_t off_len = off_bt + Align16(bt_bytes);
  const size_t off_pg = off_len + Align16(len_bytes);
  const size_t off_cnt = off_pg + Align16(pg_bytes);
  const size_t in_bytes = off_cnt + Align16(cnt_bytes);
  const int max_items = pages ? pages->max_selected : table.max_blocks_per_seq;
  const size_t ws_bytes = PagedDecodeWorkspaceBytes(n, io.num_heads, c.num_kv_heads, max_items);

  MEMPIPE_RETURN_IF_ERROR(Reserve(staging_in_, in_bytes));
  MEMPIPE_RETURN_IF_ERROR(Reserve(staging_out_, q_bytes));
  MEMPIPE_RETURN_IF_ERROR(Reserve(inputs_, in_bytes));
  MEMPIPE_RETURN_IF_ERROR(Reserve(output_, q_bytes));
  MEMPIPE_RETURN_IF_ERROR(Reserve(workspace_, ws_bytes));

  auto* in = static_cast<uint8_t*>(staging_in_.data());
  std::memcpy(in, io.query, q_bytes);
  std::memcpy(in + off_bt, table.block_table, bt_bytes);
  std::memcpy(in + off_len, table.seq_lens, len_bytes);
  if (pages != nullptr) {
    std::memcpy(in + off_pg, pages->pages, pg_bytes);
    std::memcpy(in + off_cnt, pages->counts, cnt_bytes);
  }
  MEMPIPE_RETURN_IF_ERROR(CopyToDeviceAsync(inputs_.data(), in, in_bytes, stream_.get()));

  auto* dev_in = static_cast<uint8_t*>(inputs_.data());
  DecodeIo dio = io;
  dio.query = dev_in;
  dio.out = output_.data();
  const BlockTableView dtable{reinterpret_cast<const int32_t*>(dev_in + off_bt),
                              reinterpret_cast<const int32_t*>(dev_in + off_len), n,
                              table.max_blocks_per_seq};
  const KvCacheView dcache = l->DeviceView();
  if (pages == nullptr) {
    MEMPIPE_RETURN_IF_ERROR(DenseDecodeGpu(dio, dcache, dtable, scale, workspace_.data(),
                                           workspace_.size(), stream_.get()));
  } else {
    const PageList dpages{reinterpret_cast<const int32_t*>(dev_in + off_pg),
                          reinterpret_cast<const int32_t*>(dev_in + off_cnt), pages->num_kv_heads,
                          pages->max_selected};
    MEMPIPE_RETURN_IF_ERROR(SparseDecodeGpu(dio, dcache, dtable, dpages, scale, workspace_.data(),
                                            workspace_.size(), stream_.get()));
  }
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostAsync(staging_out_.data(), output_.data(), q_bytes, stream_.get()));
  MEMPIPE_RETURN_IF_ERROR(done_.Record(stream_.get()));
  // The hand-off: the caller reads io.out on return.
  MEMPIPE_RETURN_IF_ERROR(done_.Synchronize());
  std::memcpy(io.out, staging_out_.data(), q_bytes);
  return absl::OkStatus();
}

}  // namespace mempipe
