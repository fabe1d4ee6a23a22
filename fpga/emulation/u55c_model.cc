#include "fpga/emulation/u55c_model.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace mempipe {

double U55cModel::DmaSeconds(double bytes, DmaDirection dir) const {
  if (bytes <= 0) return 0;
  const double chunks = std::ceil(bytes / p_.dma_max_transfer_bytes);
  const bool to_card = dir == DmaDirection::kToCard;
  const double bps = to_card ? p_.dma_to_card_bps : p_.dma_from_card_bps;
  const double small_bps = to_card ? p_.dma_small_to_card_bps : p_.dma_small_from_card_bps;
  // Each chunk: the fixed overhead, its first dma_small_knee_bytes at the small-transfer rate,
  // the rest at the large-buffer rate.
  const double slow = std::min(bytes / chunks, p_.dma_small_knee_bytes);
  const double extra = small_bps > 0 && small_bps < bps ? slow / small_bps - slow / bps : 0.0;
  return chunks * (p_.dma_transfer_overhead_s + extra) + bytes / bps;
}

double U55cModel::ChannelReadBps() const {
  const double channel = p_.hbm_channel_peak_bps * p_.hbm_efficiency;
  const double port = static_cast<double>(p_.axi_word_bytes) * p_.PricedClockHz();
  return std::min(channel, port);
}

double U55cModel::CuSeconds(const CuLaunch& l) const {
  const double hz = p_.PricedClockHz();
  const double memory_s = l.hbm_bytes / ChannelReadBps();
  const double stream_s = l.stream_words / hz;
  const double select_s = l.select_clocks / hz;
  // The first row pays the whole fill; later rows overlap most of theirs with the one before.
  const double fill_s =
      l.rows > 0 ? (p_.pipeline_fill_clocks + (l.rows - 1.0) * p_.row_fill_clocks) / hz : 0.0;
  const double serial_s = l.serial_clocks / hz;
  // Load, score and select overlap under dataflow: the slowest stage sets the pace; the serial
  // part (the RTL select's emit pass) and the per-row fill add to it.
  return std::max({memory_s, stream_s, select_s}) + serial_s + fill_s;
}

CallEstimate U55cModel::Call(const std::vector<double>& to_card_bytes,
                             const std::vector<CuLaunch>& launches,
                             const std::vector<double>& from_card_bytes) const {
  CallEstimate e;
  for (double b : to_card_bytes) e.to_card_s += DmaSeconds(b, DmaDirection::kToCard);
  for (double b : from_card_bytes) e.from_card_s += DmaSeconds(b, DmaDirection::kFromCard);
  if (!launches.empty()) {
    e.launch_s = p_.launch_latency_s + (launches.size() - 1) * p_.per_cu_start_s;
    // Launches sharing a compute unit run one after another; a launch placed on a CU beyond
    // the ones that fit (PricedCus) runs on CU (cu mod PricedCus).
    const int cus = std::max(1, p_.PricedCus());
    std::map<int, double> busy;
    for (const CuLaunch& l : launches) busy[((l.cu % cus) + cus) % cus] += CuSeconds(l);
    for (const auto& [cu, s] : busy) e.kernel_s = std::max(e.kernel_s, s);
  }
  e.total_s = e.to_card_s + e.launch_s + e.kernel_s + e.from_card_s;
  e.energy_j =
      p_.board_power_active_w * e.kernel_s + p_.board_power_idle_w * (e.total_s - e.kernel_s);
  return e;
}

}  // namespace mempipe
