// Verilator harness for the RTL kernel fpga/rtl/mempipe_score_topk.sv: device memory, an AXI4
// slave model per master port (HBM-like read latency, a shared read bandwidth cap, random
// back-pressure on every channel the slave drives), an AXI4-Lite driver doing what XRT's
// xrt::kernel does (arguments, ap_start, wait for ap_done), and a cycle count per call.
//
//   RtlScoreTopk k(MemModel{.seed = s});
//   uint64_t dg = k.Alloc(bytes);  std::memcpy(k.Mem(dg), src, bytes);
//   RtlRun r = k.Run(args);        // r.cycles: ap_start to ap_done; r.scores: every page score
#ifndef MEMPIPE_TESTS_FPGA_RTL_RTL_HARNESS_H_
#define MEMPIPE_TESTS_FPGA_RTL_RTL_HARNESS_H_

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "Vscore_topk_tb_top.h"

namespace mempipe::rtl_testing {

// The memory behind both AXI masters: one HBM pseudo-channel, as on the card.
struct MemModel {
  int latency_min = 100;    // clocks from AR accepted to the first R beat can leave
  int latency_max = 200;    // (HBM read latency, ~100-200 kernel clocks)
  double read_rate = 0.68;  // R beats per clock, both ports together (14.375 GB/s x 0.9065 / 64 B
                            // at 300 MHz: u55c_params.h)
  double stall = 0.1;       // probability the slave withholds ready/valid on a given clock
  int write_latency = 30;   // clocks from W accepted to B
  uint64_t seed = 1;
};

// The kernel's scalar and pointer arguments (fpga/hls/kernels.h kScoreTopkArgs order).
struct ScoreTopkArgs {
  uint64_t digests = 0, queries = 0, block_table = 0, seq_lens = 0, pages = 0, counts = 0;
  int num_seqs = 0, group = 0, head_dim = 0, dtype = 0, block_size = 0, max_blocks_per_seq = 0,
      max_selected = 0, k = 0, sinks = 0, locals = 0, aggregation = 0;
};

struct RtlRun {
  uint64_t cycles = 0;           // ap_start accepted .. ap_done (interrupt) seen
  std::vector<uint32_t> scores;  // page scores in the order computed (sequence, then page)
};

class RtlScoreTopk {
 public:
  explicit RtlScoreTopk(const MemModel& m) : m_(m), rng_(m.seed), top_(new Vscore_topk_tb_top) {
    mem_.assign(4096, 0);
    top_->ap_rst_n = 0;
    for (int i = 0; i < 8; ++i) Tick();
    top_->ap_rst_n = 1;
    for (int i = 0; i < 4; ++i) Tick();
  }
  ~RtlScoreTopk() { top_->final(); }

  // A 4 KB-aligned buffer of `bytes` in device memory; returns its device address.
  uint64_t Alloc(size_t bytes) {
    const uint64_t addr = mem_.size();
    mem_.resize(addr + ((bytes + 4095) / 4096 + 1) * 4096, 0);
    return addr;
  }
  uint8_t* Mem(uint64_t addr) { return mem_.data() + addr; }

  // One call: writes the arguments, starts the kernel and clocks it until ap_done. Throws
  // std::runtime_error on a protocol violation or after `max_cycles`.
  RtlRun Run(const ScoreTopkArgs& a, uint64_t max_cycles = 200'000'000) {
    const uint64_t ptrs[6] = {a.digests, a.queries, a.block_table, a.seq_lens, a.pages, a.counts};
    for (int i = 0; i < 6; ++i) {
      WriteReg(0x10 + 0xC * i, static_cast<uint32_t>(ptrs[i]));
      WriteReg(0x14 + 0xC * i, static_cast<uint32_t>(ptrs[i] >> 32));
    }
    const int scalars[11] = {
        a.num_seqs,     a.group, a.head_dim, a.dtype,  a.block_size, a.max_blocks_per_seq,
        a.max_selected, a.k,     a.sinks,    a.locals, a.aggregation};
    for (int i = 0; i < 11; ++i) WriteReg(0x58 + 8 * i, static_cast<uint32_t>(scalars[i]));
    WriteReg(0x04, 1);  // GIE
    WriteReg(0x08, 1);  // IER: ap_done
    if ((ReadReg(0x00) & 0x4) == 0) throw std::runtime_error("kernel not idle before ap_start");
    scores_.clear();
    WriteReg(0x00, 1);  // ap_start
    const uint64_t start = cycle_;
    while (!top_->irq) {
      Tick();
      if (cycle_ - start > max_cycles) {
        char state[160];
        const uint64_t d = top_->dbg_state;
        std::snprintf(state, sizeof(state),
                      "kernel did not finish: reader %d core %d select %d q_fifo %d tags %d "
                      "bid_resv %d dg_resv %d bid_fifo %d slots %d credits %d",
                      int(d >> 60), int(d >> 56 & 15), int(d >> 52 & 15), int(d >> 44 & 255),
                      int(d >> 36 & 255), int(d >> 26 & 1023), int(d >> 16 & 1023),
                      int(d >> 8 & 255), int(d >> 4 & 15), int(d & 15));
        throw std::runtime_error(state);
      }
    }
    RtlRun r;
    r.cycles = cycle_ - start;
    const uint32_t ctrl = ReadReg(0x00);
    if ((ctrl & 0x2) == 0) throw std::runtime_error("interrupt without ap_done");
    if (ReadReg(0x00) & 0x2) throw std::runtime_error("ap_done not cleared on read");
    WriteReg(0x0C, 1);  // ISR toggle: clear the interrupt
    for (int i = 0; i < 4; ++i) Tick();
    if (top_->irq) throw std::runtime_error("interrupt not cleared");
    if (!rd_[0].q.empty() || !rd_[1].q.empty() || !aw_.empty() || !w_.empty() || !b_.empty()) {
      throw std::runtime_error("AXI traffic still in flight after ap_done");
    }
    r.scores = scores_;
    return r;
  }

  uint64_t cycle() const { return cycle_; }

 private:
  struct Burst {
    uint64_t addr;
    int beats, next = 0;
    uint64_t ready_at;
  };
  struct ReadPort {
    std::deque<Burst> q;
    bool presenting = false;  // rvalid is up with the front burst's next beat
  };
  struct WData {
    uint32_t data[16];
    uint64_t strb;
  };

  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }

  void CheckBurst(uint64_t addr, int beats) {
    if (addr % 64 != 0) throw std::runtime_error("unaligned burst " + std::to_string(addr));
    if (addr / 4096 != (addr + 64ull * beats - 1) / 4096) {
      throw std::runtime_error("burst crosses 4 KB at " + std::to_string(addr));
    }
    if (addr + 64ull * beats > mem_.size()) {
      throw std::runtime_error("burst outside device memory at " + std::to_string(addr));
    }
  }

  // Drives the slave side for this clock, samples handshakes, then clocks the design.
  void Tick() {
    // --- slave outputs ---
    top_->dg_arready = !Chance(m_.stall);
    top_->io_arready = !Chance(m_.stall);
    top_->io_awready = !Chance(m_.stall);
    top_->io_wready = !Chance(m_.stall);
    tokens_ = std::min(tokens_ + m_.read_rate, 2.0);
    // At most one new R beat per clock on the channel (ports alternating priority), each beat
    // paid from the bandwidth tokens; a presented beat stays valid until taken (AXI), so a port
    // the kernel stalls never blocks the other one.
    for (int j = 0; j < 2; ++j) {
      const int p = (rr_ + j) % 2;
      if (rd_[p].presenting || rd_[p].q.empty() || rd_[p].q.front().ready_at > cycle_) continue;
      if (tokens_ < 1.0 || Chance(m_.stall)) break;
      tokens_ -= 1.0;
      rd_[p].presenting = true;
      rr_ = 1 - p;
      break;
    }
    for (int p = 0; p < 2; ++p) {
      const bool v = rd_[p].presenting;
      uint32_t words[16] = {};
      bool last = false;
      if (v) {
        const Burst& b = rd_[p].q.front();
        std::memcpy(words, mem_.data() + b.addr + 64ull * b.next, 64);
        last = b.next == b.beats - 1;
      }
      if (p == 0) {
        top_->dg_rvalid = v;
        top_->dg_rlast = last;
        for (int i = 0; i < 16; ++i) top_->dg_rdata[i] = words[i];
      } else {
        top_->io_rvalid = v;
        top_->io_rlast = last;
        for (int i = 0; i < 16; ++i) top_->io_rdata[i] = words[i];
      }
    }
    top_->io_bvalid = !b_.empty() && b_.front() <= cycle_ && !Chance(m_.stall);
    top_->ap_clk = 0;
    top_->eval();
    // --- sample handshakes ---
    if (top_->dg_arvalid && top_->dg_arready) {
      CheckBurst(top_->dg_araddr, top_->dg_arlen + 1);
      rd_[0].q.push_back({top_->dg_araddr, top_->dg_arlen + 1, 0, cycle_ + Latency()});
    }
    if (top_->io_arvalid && top_->io_arready) {
      CheckBurst(top_->io_araddr, top_->io_arlen + 1);
      rd_[1].q.push_back({top_->io_araddr, top_->io_arlen + 1, 0, cycle_ + Latency()});
    }
    for (int p = 0; p < 2; ++p) {
      const bool taken = rd_[p].presenting && (p == 0 ? top_->dg_rready : top_->io_rready);
      if (!taken) continue;
      rd_[p].presenting = false;
      Burst& b = rd_[p].q.front();
      if (++b.next == b.beats) rd_[p].q.pop_front();
    }
    if (top_->io_awvalid && top_->io_awready) {
      if (top_->io_awlen != 0) throw std::runtime_error("write bursts are single beats");
      CheckBurst(top_->io_awaddr, 1);
      aw_.push_back(top_->io_awaddr);
    }
    if (top_->io_wvalid && top_->io_wready) {
      WData d;
      for (int i = 0; i < 16; ++i) d.data[i] = top_->io_wdata[i];
      d.strb = top_->io_wstrb;
      if (!top_->io_wlast) throw std::runtime_error("wlast missing on a single-beat write");
      w_.push_back(d);
    }
    if (top_->io_bvalid && top_->io_bready) b_.pop_front();
    while (!aw_.empty() && !w_.empty()) {
      const uint64_t addr = aw_.front();
      const WData& d = w_.front();
      const uint8_t* src = reinterpret_cast<const uint8_t*>(d.data);
      for (int i = 0; i < 64; ++i) {
        if ((d.strb >> i) & 1) mem_[addr + i] = src[i];
      }
      aw_.pop_front();
      w_.pop_front();
      b_.push_back(cycle_ + m_.write_latency);
    }
    if (top_->dbg_score_valid) scores_.push_back(top_->dbg_score);
    // --- clock edge ---
    top_->ap_clk = 1;
    top_->eval();
    ++cycle_;
  }

  uint64_t Latency() {
    return std::uniform_int_distribution<int>(m_.latency_min, m_.latency_max)(rng_);
  }

  void WriteReg(uint32_t addr, uint32_t value) {
    top_->s_axi_control_awaddr = addr;
    top_->s_axi_control_wdata = value;
    top_->s_axi_control_awvalid = 1;
    top_->s_axi_control_wvalid = 1;
    top_->s_axi_control_bready = 1;
    for (int i = 0; !(top_->s_axi_control_awready); ++i) {
      Settle();
      if (top_->s_axi_control_awready) break;
      Tick();
      if (i > 100) throw std::runtime_error("AXI-Lite write not accepted");
    }
    Tick();  // handshake edge
    top_->s_axi_control_awvalid = 0;
    top_->s_axi_control_wvalid = 0;
    while (!top_->s_axi_control_bvalid) Tick();
    Tick();  // B accepted
    top_->s_axi_control_bready = 0;
  }
  uint32_t ReadReg(uint32_t addr) {
    top_->s_axi_control_araddr = addr;
    top_->s_axi_control_arvalid = 1;
    top_->s_axi_control_rready = 1;
    Settle();
    while (!top_->s_axi_control_arready) Tick();
    Tick();
    top_->s_axi_control_arvalid = 0;
    Settle();
    while (!top_->s_axi_control_rvalid) Tick();
    const uint32_t v = top_->s_axi_control_rdata;
    Tick();
    top_->s_axi_control_rready = 0;
    return v;
  }
  void Settle() {
    top_->ap_clk = 0;
    top_->eval();
  }

  MemModel m_;
  std::mt19937_64 rng_;
  std::unique_ptr<Vscore_topk_tb_top> top_;
  std::vector<uint8_t> mem_;
  ReadPort rd_[2];  // 0: gmem_dg, 1: gmem_io
  std::deque<uint64_t> aw_;
  std::deque<WData> w_;
  std::deque<uint64_t> b_;  // B due cycles
  std::vector<uint32_t> scores_;
  double tokens_ = 0;
  int rr_ = 0;
  uint64_t cycle_ = 0;
};

}  // namespace mempipe::rtl_testing

#endif  // MEMPIPE_TESTS_FPGA_RTL_RTL_HARNESS_H_
