// mempipe fpga: every parameter of the modeled Alveo U55C, with its source.
//
// This is the ONE place the emulated device's timing and energy model takes numbers from.
// Figures marked "estimate" have no measurement behind them; everything the model derives from
// them is modeled, and reports must say so. Sources are the ones collected in
// docs/FPGA-NOTES.md ("Alveo U55C figures").
//
//   U55cParams p;                       // the documented defaults
//   p.launch_latency_s = 100e-6;        // e.g. the slow end of the reported launch range
//   U55cModel model(p);
#ifndef MEMPIPE_FPGA_EMULATION_U55C_PARAMS_H_
#define MEMPIPE_FPGA_EMULATION_U55C_PARAMS_H_

namespace mempipe {

struct U55cParams {
  // --- HBM2 --------------------------------------------------------------------------------
  // 16 GB as 32 pseudo-channels of 512 MB, 14.375 GB/s each (460 GB/s in all). AMD UG1393.
  int hbm_channels = 32;
  double hbm_channel_bytes = 512.0 * 1024 * 1024;
  double hbm_channel_peak_bps = 14.375e9;
  // Fraction of the peak a kernel reaches with long sequential bursts on its own channel.
  // Calibrated so 32 channels give 417 GB/s, inside the 410-425 GB/s measured on U280/U55C
  // kernels (Vitis_Accel_Examples hbm_bandwidth: 421 GB/s; Shuhai, FCCM'20: 425 GB/s; a U55C
  // user, XRT issue 8687: 410 GB/s kernel time). 417 / 460 = 0.9065.
  double hbm_efficiency = 417.0 / 460.0;

  // --- kernel ------------------------------------------------------------------------------
  // Vitis's default kernel clock target (UG1393 examples); the platform limit is unverified.
  // A ceiling, not what the model prices by default: see PricedClockHz().
  double kernel_clock_hz = 300e6;
  // ESTIMATE of the RTL kernel's clock (fpga/rtl, pipelined fp32 units): the longest
  // register-to-register path of the fp32 stages is 17 cells after Yosys 0.23 synth_xilinx
  // -family xcup (fpga/rtl/synth_results/ltp_*.txt); at 0.3-0.5 ns per level on UltraScale+ -2
  // that is 5.1-8.5 ns, 118-196 MHz. No open timing model for UltraScale+ exists; place and
  // route would decide. fpga/rtl/synth.md. (Was 40 MHz for the combinational units.)
  double rtl_clock_estimate_hz = 150e6;
  // Compute units of the RTL kernel that fit the U55C's 1,303,680 LUTs, as the host needs it
  // built (MAX_TOPK = 1024, kMaxTopK): ESTIMATE. Measured (Yosys 0.23 synth_xilinx -family
  // xcup, hierarchical, no place and route) at MAX_TOPK = 16: 105,423 LUTs per CU -> 12 CUs;
  // the select alone synthesized at 16 and 64 entries grows 132 LUTs per entry, so the 1,008
  // further entries add ~133k (linear extrapolation) -> ~238k LUTs per CU -> 5 CUs.
  // fpga/rtl/synth.md.
  int rtl_cus_that_fit = 5;
  // One 512-bit AXI beat per clock per port: the platform's datapath width (UG1120).
  int axi_word_bytes = 64;
  // Compute units of each kernel in the xclbin, one per HBM pseudo-channel (device_layout.h):
  // the placement of KV-head slices. The model runs them on PricedCus() units: a slice whose CU
  // does not fit is scanned by CU (cu mod PricedCus()) after that unit's own slices.
  int num_cus = 32;
  // Clocks of a launch not explained by the per-page terms below: the first row's seq_lens,
  // query and block-table round trips and first digests (HBM latency) and the score pipeline's
  // depth. Fitted to the RTL kernel simulated in Verilator behind an HBM-like memory model
  // (latency 100-200 clocks, random back-pressure): `fpga_rtl_cycles` on its fit shapes
  // (fpga/rtl/cycles.md), the pipelined RTL with the channel read at the priced clock (1 beat
  // per clock at 150 MHz). Was 659 for the combinational RTL, an estimate of 250 before that.
  int pipeline_fill_clocks = 676;
  // Clocks each further sequence of a launch adds beyond its per-page terms (its round trips
  // mostly overlap the previous sequence). Fitted as pipeline_fill_clocks (multi-sequence fit
  // shapes of fpga/rtl/cycles.md; the deeper pipeline drains between sequences: was 4).
  int row_fill_clocks = 32;
  // (Query head, 512-bit digest word) pairs the score kernel computes per clock: the RTL score
  // core (fpga/rtl/mempipe_score_core.sv) has 32 lanes x 2 fp32 multipliers for one head.
  // Structural; confirmed by the simulated cycle counts (fpga/rtl/cycles.md).
  int score_heads_per_clock = 1;
  // Clocks of the RTL's pipelined fp32 adder (mempipe_fp32_add, 4 stages): a lane's running sum
  // for one head is ready again only this many clocks later, so the core issues word-major,
  // head-minor and a page costs row_words x max(group, score_add_stages) clocks; the sum
  // aggregation adds heads one per score_add_stages clocks ((group - 1) x this + 1 per page).
  // Structural (fpga/rtl/mempipe_score_core.sv); confirmed by the simulated cycle counts.
  int score_add_stages = 4;
  // Clocks per page of the select stage's emit pass, which runs after a row's last score and
  // overlaps nothing (plus max_selected clocks to write the row). The RTL's emit loop reads one
  // buffered score per clock (fpga/rtl/mempipe_topk_select.sv). Structural.
  double select_clocks_per_page = 1.0;
  // Page scores the kernel buffers between its score core and its select (SCORE_DEPTH in
  // fpga/rtl/mempipe_score_topk.sv): while the select emits one row, the core scores this many
  // pages of the next. Structural.
  int score_fifo_pages = 16;
  // Host call to kernel completion for an empty kernel, per launch batch: 16-56 us on a U25
  // (XRT issue 6601), 50-100 us on a U55C (XRT issue 8687). The U55C's lower end.
  double launch_latency_s = 50e-6;
  // Extra cost per additional compute unit started in the same batch (one xrt::run::start
  // each). Estimate: a few microseconds of register writes over PCIe per start.
  double per_cu_start_s = 2e-6;

  // --- PCIe DMA (platform xilinx_u55c_gen3x16_xdma_3_202210_1: Gen3 x16, UG1120) -------------
  // Large-buffer streaming rates: 9.3-11.6 GB/s to the card, 10.9-12.2 GB/s back
  // (XRT PRs 5448 and 937). Middle of each range.
  double dma_to_card_bps = 10.5e9;
  double dma_from_card_bps = 11.5e9;
  // Fixed cost of one DMA transfer (descriptor setup, interrupt, xrt::bo::sync), and the rate of
  // a transfer's first dma_small_knee_bytes, slower than the large-buffer rate. Fitted to XRT
  // issue 6787 (U50, the same Gen3 x16 XDMA shell family): 0.67-0.86 GB/s for 4 KB buffers and
  // 2,975 MB/s to the card / 3,025 MB/s back (medians of ten runs) for 40,960-byte buffers.
  // 4.4 us + 4096 B / 4.3 GB/s -> 0.77 GB/s; 4.4 us + 40960 B / 4.3 GB/s -> 2.94 GB/s (to the
  // card), 4.4 us + 40960 B / 4.5 GB/s -> 3.03 GB/s (back). The affine model used before (5 us +
  // bytes / the large-buffer rate) was 1.55x too fast at 40 KB
  // (tests/fpga/emulation/u55c_model_test.cc).
  double dma_transfer_overhead_s = 4.4e-6;
  double dma_small_to_card_bps = 4.3e9;
  double dma_small_from_card_bps = 4.5e9;
  // ESTIMATE: bytes of a transfer that move at the small rate before it streams at the large one.
  // No published point lies between 40 KB and 256 MB; a larger knee is the pessimistic side (it
  // costs 144 us more per 256 MB transfer at 1 MiB, 0.6%, inside the large-buffer calibration).
  double dma_small_knee_bytes = 1024.0 * 1024;
  // Largest single DMA (UG1120: 256 MB); larger buffers cost one overhead per chunk.
  double dma_max_transfer_bytes = 256.0 * 1024 * 1024;

  // --- board power (all estimates) ------------------------------------------------------------
  // The card is rated up to about 150 W, passively cooled (unverified). Estimate for a board
  // whose kernels stream HBM: 75 W while kernels run, 25 W while it waits on the host (PCIe link,
  // HBM refresh, shell logic) -- both estimates, used only for modeled energy.
  double board_power_active_w = 75.0;
  double board_power_idle_w = 25.0;

  // --- what-if ------------------------------------------------------------------------------
  // Opt-in what-if: price the kernel at the Vitis targets (kernel_clock_hz, num_cus) instead of
  // what the RTL that exists reaches. Off by default: the model must not make the card look
  // better than the RTL would (VitisTarget() below returns the labelled variant).
  bool vitis_target_what_if = false;

  // The clock the model prices kernel clocks at: min(kernel_clock_hz, rtl_clock_estimate_hz)
  // (the RTL's estimate, fpga/rtl/synth.md), or kernel_clock_hz under vitis_target_what_if.
  double PricedClockHz() const {
    return vitis_target_what_if || rtl_clock_estimate_hz <= 0 ||
                   kernel_clock_hz < rtl_clock_estimate_hz
               ? kernel_clock_hz
               : rtl_clock_estimate_hz;
  }
  // Compute units that run at once: min(num_cus, rtl_cus_that_fit) (Yosys resource counts,
  // fpga/rtl/synth.md), or num_cus under vitis_target_what_if. Fewer units stream fewer HBM
  // pseudo-channels at once.
  int PricedCus() const {
    return vitis_target_what_if || rtl_cus_that_fit <= 0 || num_cus < rtl_cus_that_fit
               ? num_cus
               : rtl_cus_that_fit;
  }
  // WHAT-IF, not the RTL: the card at the Vitis targets (300 MHz, 32 CUs), as every modeled
  // FPGA figure before issue 15's synthesis priced it. Reports using it must say so.
  static U55cParams VitisTarget() {
    U55cParams p;
    p.vitis_target_what_if = true;
    return p;
  }
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_EMULATION_U55C_PARAMS_H_
