// mempipe fpga rtl: mempipe_score_topk as an XRT RTL kernel (steps 2+3 for one KV head).
//
// The same kernel as fpga/hls/score_topk_kernel.cc, argument for argument (fpga/hls/kernels.h
// kScoreTopkArgs; register offsets as fpga/host/xclbin_writer.cc lays them out), so the host runtime
// drives either one unchanged:
//
//   s_axi_control  ap_ctrl_hs: 0x00 ctrl (start, done, idle, ready, auto_restart), 0x04 GIE,
//                  0x08 IER, 0x0C ISR, then 0x10 digests, 0x1C queries, 0x28 block_table,
//                  0x34 seq_lens, 0x40 pages, 0x4C counts (64-bit, low word first, a reserved
//                  word after each), 0x58 num_seqs, 0x60 group, 0x68 head_dim, 0x70 dtype,
//                  0x78 block_size, 0x80 max_blocks_per_seq, 0x88 max_selected, 0x90 k,
//                  0x98 sinks, 0xA0 locals, 0xA8 aggregation.
//   m_axi_gmem_dg  512-bit AXI4 read master: digest rows, one burst (2 x row_words beats) per page.
//   m_axi_gmem_io  512-bit AXI4 master: seq_lens, queries and block_table reads; pages and counts
//                  writes (single-beat, byte strobes, consecutive 32-bit writes coalesced).
//
//   reader (gmem_io) --lens/queries/table--> block ids --> digest AR (gmem_dg) --> digest FIFO
//        |                       |query FIFO                                         |
//        +-- n per sequence --> score core (mempipe_score_core) <---------------------+
//                                   | scores
//                               select (mempipe_topk_select) --> write coalescer (gmem_io)
//
// Limits (the host checks them, as for the HLS kernel): block_size a power of two, head_dim
// 64..256 with whole 512-bit rows, group <= MAX_GROUP, pages per sequence <= MAX_PAGES,
// k - sinks - locals <= MAX_TOPK, buffers 64-byte aligned (seq_lens and block_table 4-byte).
module mempipe_score_topk #(
    parameter int MAX_TOPK = 1024,
    parameter int MAX_PAGES = 65536,
    parameter int MAX_GROUP = 16,
    parameter int DG_FIFO_DEPTH = 256,  // digest words buffered: covers ~HBM latency at 1/clock
    parameter int BID_FIFO_DEPTH = 128,  // block ids read ahead
    parameter int Q_FIFO_DEPTH = 64
) (
    input  logic         ap_clk,
    input  logic         ap_rst_n,
    // verilator lint_off SYMRSVDWORD
    output logic         interrupt,
    // verilator lint_on SYMRSVDWORD
    // AXI4-Lite control
    input  logic [11:0]  s_axi_control_awaddr,
    input  logic         s_axi_control_awvalid,
    output logic         s_axi_control_awready,
    input  logic [31:0]  s_axi_control_wdata,
    input  logic [3:0]   s_axi_control_wstrb,
    input  logic         s_axi_control_wvalid,
    output logic         s_axi_control_wready,
    output logic [1:0]   s_axi_control_bresp,
    output logic         s_axi_control_bvalid,
    input  logic         s_axi_control_bready,
    input  logic [11:0]  s_axi_control_araddr,
    input  logic         s_axi_control_arvalid,
    output logic         s_axi_control_arready,
    output logic [31:0]  s_axi_control_rdata,
    output logic [1:0]   s_axi_control_rresp,
    output logic         s_axi_control_rvalid,
    input  logic         s_axi_control_rready,
    // AXI4 master: digests (read only)
    output logic [63:0]  m_axi_gmem_dg_araddr,
    output logic [7:0]   m_axi_gmem_dg_arlen,
    output logic [2:0]   m_axi_gmem_dg_arsize,
    output logic [1:0]   m_axi_gmem_dg_arburst,
    output logic         m_axi_gmem_dg_arvalid,
    input  logic         m_axi_gmem_dg_arready,
    input  logic [511:0] m_axi_gmem_dg_rdata,
    input  logic [1:0]   m_axi_gmem_dg_rresp,
    input  logic         m_axi_gmem_dg_rlast,
    input  logic         m_axi_gmem_dg_rvalid,
    output logic         m_axi_gmem_dg_rready,
    output logic [63:0]  m_axi_gmem_dg_awaddr,
    output logic [7:0]   m_axi_gmem_dg_awlen,
    output logic [2:0]   m_axi_gmem_dg_awsize,
    output logic [1:0]   m_axi_gmem_dg_awburst,
    output logic         m_axi_gmem_dg_awvalid,
    input  logic         m_axi_gmem_dg_awready,
    output logic [511:0] m_axi_gmem_dg_wdata,
    output logic [63:0]  m_axi_gmem_dg_wstrb,
    output logic         m_axi_gmem_dg_wlast,
    output logic         m_axi_gmem_dg_wvalid,
    input  logic         m_axi_gmem_dg_wready,
    input  logic [1:0]   m_axi_gmem_dg_bresp,
    input  logic         m_axi_gmem_dg_bvalid,
    output logic         m_axi_gmem_dg_bready,
    // AXI4 master: everything else
    output logic [63:0]  m_axi_gmem_io_araddr,
    output logic [7:0]   m_axi_gmem_io_arlen,
    output logic [2:0]   m_axi_gmem_io_arsize,
    output logic [1:0]   m_axi_gmem_io_arburst,
    output logic         m_axi_gmem_io_arvalid,
    input  logic         m_axi_gmem_io_arready,
    input  logic [511:0] m_axi_gmem_io_rdata,
    input  logic [1:0]   m_axi_gmem_io_rresp,
    input  logic         m_axi_gmem_io_rlast,
    input  logic         m_axi_gmem_io_rvalid,
    output logic         m_axi_gmem_io_rready,
    output logic [63:0]  m_axi_gmem_io_awaddr,
    output logic [7:0]   m_axi_gmem_io_awlen,
    output logic [2:0]   m_axi_gmem_io_awsize,
    output logic [1:0]   m_axi_gmem_io_awburst,
    output logic         m_axi_gmem_io_awvalid,
    input  logic         m_axi_gmem_io_awready,
    output logic [511:0] m_axi_gmem_io_wdata,
    output logic [63:0]  m_axi_gmem_io_wstrb,
    output logic         m_axi_gmem_io_wlast,
    output logic         m_axi_gmem_io_wvalid,
    input  logic         m_axi_gmem_io_wready,
    input  logic [1:0]   m_axi_gmem_io_bresp,
    input  logic         m_axi_gmem_io_bvalid,
    output logic         m_axi_gmem_io_bready
);
  wire clk = ap_clk;
  logic rst;
  always_ff @(posedge clk) rst <= !ap_rst_n;

  // =============================== control registers (ap_ctrl_hs) ===============================
  logic [31:0] regs[64];  // 0x00..0xFC by word; the arguments live at 0x10..0xAC
  logic ap_start, ap_done, ap_idle, auto_restart, gie;
  logic [1:0] ier, isr;
  logic run_start, run_done, running;
  assign s_axi_control_awready = s_axi_control_awvalid && s_axi_control_wvalid &&
                                 !s_axi_control_bvalid;
  assign s_axi_control_wready = s_axi_control_awready;
  assign s_axi_control_bresp = 2'b00;
  assign s_axi_control_rresp = 2'b00;
  assign s_axi_control_arready = !s_axi_control_rvalid;
  wire [5:0] wa = s_axi_control_awaddr[7:2];
  wire [5:0] ra = s_axi_control_araddr[7:2];
  wire wr_en = s_axi_control_awready;
  wire rd_en = s_axi_control_arvalid && s_axi_control_arready;
  assign interrupt = gie && |(isr & ier);
  assign run_start = ap_start && !running;
  always_ff @(posedge clk) begin
    if (rst) begin
      s_axi_control_bvalid <= 1'b0;
      s_axi_control_rvalid <= 1'b0;
      ap_start <= 1'b0;
      ap_done <= 1'b0;
      auto_restart <= 1'b0;
      gie <= 1'b0;
      ier <= '0;
      isr <= '0;
    end else begin
      if (s_axi_control_bvalid && s_axi_control_bready) s_axi_control_bvalid <= 1'b0;
      if (s_axi_control_rvalid && s_axi_control_rready) s_axi_control_rvalid <= 1'b0;
      if (wr_en) begin
        s_axi_control_bvalid <= 1'b1;
        case (wa)
          6'h00: begin
            if (s_axi_control_wdata[0]) ap_start <= 1'b1;
            auto_restart <= s_axi_control_wdata[7];
          end
          6'h01: gie <= s_axi_control_wdata[0];
          6'h02: ier <= s_axi_control_wdata[1:0];
          6'h03: isr <= isr ^ s_axi_control_wdata[1:0];  // toggle on write
          default: regs[wa] <= s_axi_control_wdata;
        endcase
      end
      if (rd_en) begin
        s_axi_control_rvalid <= 1'b1;
        case (ra)
          6'h00: begin
            s_axi_control_rdata <= {24'd0, auto_restart, 3'd0, ap_start && !running, ap_idle,
                                    ap_done, ap_start};
            ap_done <= 1'b0;  // clear on read
          end
          6'h01: s_axi_control_rdata <= {31'd0, gie};
          6'h02: s_axi_control_rdata <= {30'd0, ier};
          6'h03: s_axi_control_rdata <= {30'd0, isr};
          default: s_axi_control_rdata <= regs[ra];
        endcase
      end
      // ap_ready is asserted with the start (arguments latched), ap_done at the end.
      if (run_start) begin
        ap_start <= auto_restart;
        if (ier[1]) isr[1] <= 1'b1;
      end
      if (run_done) begin
        ap_done <= 1'b1;
        if (ier[0]) isr[0] <= 1'b1;
      end
    end
  end

  // ================================ arguments, latched at start ==================================
  logic [63:0] a_dg, a_q, a_tb, a_len, a_pages, a_counts;
  logic [31:0] num_seqs, head_dim, block_size, mbps, max_sel, k, sinks, locals;
  logic [4:0] group, row_words, q_row_words;
  logic [1:0] dtype;
  logic agg_sum;
  logic [5:0] bs_log2, pb_log2;  // block_size, bytes per page of digests (2 x row)
  always_ff @(posedge clk) begin
    if (run_start) begin
      a_dg <= {regs[5], regs[4]};
      a_q <= {regs[8], regs[7]};
      a_tb <= {regs[11], regs[10]};
      a_len <= {regs[14], regs[13]};
      a_pages <= {regs[17], regs[16]};
      a_counts <= {regs[20], regs[19]};
      num_seqs <= regs[22];
      group <= regs[24][4:0];
      head_dim <= regs[26];
      dtype <= regs[28][1:0];
      block_size <= regs[30];
      mbps <= regs[32];
      max_sel <= regs[34];
      k <= regs[36];
      sinks <= regs[38];
      locals <= regs[40];
      agg_sum <= regs[42][0];
      // head_dim x element bytes / 64: fp32 d/16, 16-bit d/32; queries are fp32 rows
      row_words <= regs[28][1:0] == 2'd0 ? regs[26][8:4] : 5'(regs[26][8:5]);
      q_row_words <= regs[26][8:4];
      bs_log2 <= '0;
      for (int i = 0; i < 32; i++) if (regs[30][i]) bs_log2 <= 6'(i);
      pb_log2 <= '0;
      for (int i = 0; i < 10; i++) begin
        if ((regs[28][1:0] == 2'd0 ? regs[26][9:0] : regs[26][9:0] >> 1) == (10'd1 << i)) begin
          pb_log2 <= 6'(i + 3);  // 2 rows x head_dim x elem bytes = 2^i x 8
        end
      end
    end
  end

  // ================================ reader (gmem_io) ================================================
  // Per sequence: the length word, then the query rows, then the block-table entries of its pages
  // (in bursts, as far ahead as the block-id FIFO has room).
  localparam int TAG_LEN = 0, TAG_Q = 1, TAG_TBL = 2;
  typedef enum logic [2:0] {
    R_IDLE,
    R_LEN_AR,
    R_LEN_WAIT,
    R_PUSH_N,
    R_Q_AR,
    R_TBL_AR,
    R_NEXT
  } rstate_t;
  rstate_t rs;
  logic [31:0] seq;
  logic [63:0] len_addr, q_addr, tb_addr;  // this sequence's
  logic [31:0] n_pages, q_left;
  logic [63:0] cur_q;  // next query word address
  logic [57:0] tw_cur, tw_last;  // table word addresses (byte address / 64)
  logic [3:0] tl_first, tl_last;  // lanes of the first and last entries
  logic len_valid;
  logic [31:0] len_value;
  // in-flight read tags (one per burst, in order)
  logic tag_push, tag_pop, tag_full, tag_empty;
  logic [9:0] tag_din, tag_dout;
  logic [4:0] tag_count;
  mempipe_fifo #(.W(10), .DEPTH(16)) u_tags (
      .clk, .rst, .push(tag_push), .din(tag_din), .full(tag_full), .pop(tag_pop), .dout(tag_dout),
      .empty(tag_empty), .count(tag_count));
  // pages per sequence, to the core and to select
  logic nc_push, nc_full, nc_empty, nc_pop, ns_full, ns_empty, ns_pop;
  logic [31:0] nc_dout, ns_dout;
  logic [2:0] nc_count, ns_count;
  mempipe_fifo #(.W(32), .DEPTH(4)) u_n_core (
      .clk, .rst, .push(nc_push), .din(n_pages), .full(nc_full), .pop(nc_pop), .dout(nc_dout),
      .empty(nc_empty), .count(nc_count));
  mempipe_fifo #(.W(32), .DEPTH(4)) u_n_sel (
      .clk, .rst, .push(nc_push), .din(n_pages), .full(ns_full), .pop(ns_pop), .dout(ns_dout),
      .empty(ns_empty), .count(ns_count));
  // block-id reservation: entries requested (16 per table word) minus entries consumed/unused
  logic [$clog2(BID_FIFO_DEPTH)+1:0] bid_resv;
  logic [$clog2(BID_FIFO_DEPTH)+1:0] bid_release;
  logic bid_pop;

  wire [63:0] len_word_addr = {len_addr[63:6], 6'd0};
  wire [6:0] q_to_4k = 7'd64 - {1'b0, cur_q[11:6]};
  wire [31:0] q_beats = q_left < {25'd0, q_to_4k} ? q_left : {25'd0, q_to_4k};
  wire [57:0] tw_left = tw_last - tw_cur + 1;
  wire [6:0] t_to_4k = 7'd64 - {1'b0, tw_cur[5:0]};
  // table bursts of up to 2 words, never crossing 4 KB
  wire [1:0] t_beats = (tw_left >= 2 && t_to_4k >= 2) ? 2'd2 : 2'd1;
  wire t_room = {1'b0, bid_resv} + 16 * t_beats <= BID_FIFO_DEPTH;

  always_comb begin
    m_axi_gmem_io_arvalid = 1'b0;
    m_axi_gmem_io_araddr = len_word_addr;
    m_axi_gmem_io_arlen = 8'd0;
    tag_din = {TAG_LEN[1:0], len_addr[5:2], 4'd0};
    case (rs)
      R_LEN_AR: m_axi_gmem_io_arvalid = !tag_full;
      R_Q_AR: begin
        m_axi_gmem_io_arvalid = !tag_full;
        m_axi_gmem_io_araddr = cur_q;
        m_axi_gmem_io_arlen = 8'(q_beats - 1);
        tag_din = {TAG_Q[1:0], 8'd0};
      end
      R_TBL_AR: begin
        m_axi_gmem_io_arvalid = !tag_full && t_room;
        m_axi_gmem_io_araddr = {tw_cur, 6'd0};
        m_axi_gmem_io_arlen = 8'(t_beats - 1);
        tag_din = {TAG_TBL[1:0], tw_cur == tw_first_r ? tl_first : 4'd0,
                   tw_cur + 58'(t_beats) - 1 == tw_last ? tl_last : 4'd15};
      end
      default: ;
    endcase
  end
  logic [57:0] tw_first_r;
  assign tag_push = m_axi_gmem_io_arvalid && m_axi_gmem_io_arready;
  assign m_axi_gmem_io_arsize = 3'd6;
  assign m_axi_gmem_io_arburst = 2'b01;
  assign nc_push = rs == R_PUSH_N && !nc_full && !ns_full;

  logic busy_any;
  always_ff @(posedge clk) begin
    if (rst) begin
      rs <= R_IDLE;
      running <= 1'b0;
    end else begin
      case (rs)
        R_IDLE:
        if (run_start) begin
          running <= 1'b1;
          seq <= '0;
          len_addr <= {regs[14], regs[13]};
          q_addr <= {regs[8], regs[7]};
          tb_addr <= {regs[11], regs[10]};
          rs <= regs[22] == 0 ? R_NEXT : R_LEN_AR;
        end
        R_LEN_AR: if (tag_push) rs <= R_LEN_WAIT;
        R_LEN_WAIT:
        if (len_valid) begin
          n_pages <= (len_value + block_size - 1) >> bs_log2;
          rs <= R_PUSH_N;
        end
        R_PUSH_N:
        if (nc_push) begin
          q_left <= 32'(group) * 32'(q_row_words);
          cur_q <= q_addr;
          tw_cur <= tb_addr[63:6];
          tw_first_r <= tb_addr[63:6];
          tl_first <= tb_addr[5:2];
          tw_last <= 58'((tb_addr + {30'd0, n_pages, 2'b00} - 4) >> 6);
          tl_last <= 4'((tb_addr + {30'd0, n_pages, 2'b00} - 4) >> 2);
          rs <= R_Q_AR;
        end
        R_Q_AR:
        if (tag_push) begin
          q_left <= q_left - q_beats;
          cur_q <= cur_q + {26'd0, q_beats, 6'd0};
          if (q_left == q_beats) rs <= n_pages == 0 ? R_NEXT : R_TBL_AR;
        end
        R_TBL_AR:
        if (tag_push) begin
          tw_cur <= tw_cur + 58'(t_beats);
          if (tw_left == 58'(t_beats)) rs <= R_NEXT;
        end
        default: begin  // R_NEXT
          if (seq + 1 >= num_seqs) begin
            if (!busy_any) begin
              running <= 1'b0;
              rs <= R_IDLE;
            end
          end else begin
            seq <= seq + 1;
            len_addr <= len_addr + 64'd4;
            q_addr <= q_addr + {26'd0, 32'(group) * 32'(q_row_words), 6'd0};
            tb_addr <= tb_addr + {30'd0, mbps, 2'b00};
            rs <= R_LEN_AR;
          end
        end
      endcase
    end
  end
  assign run_done = rs == R_NEXT && seq + 1 >= num_seqs && !busy_any;
  assign ap_idle = !running && !ap_start;

  // ---- gmem_io read data: dispatch by tag --------------------------------------------------------
  logic q_push, q_full, q_empty, q_pop;
  logic [511:0] q_dout;
  logic [$clog2(Q_FIFO_DEPTH):0] q_count;
  mempipe_fifo #(.W(512), .DEPTH(Q_FIFO_DEPTH)) u_q (
      .clk, .rst, .push(q_push), .din(m_axi_gmem_io_rdata), .full(q_full), .pop(q_pop),
      .dout(q_dout), .empty(q_empty), .count(q_count));
  // table word being split into block ids
  logic hold_v;
  logic [511:0] hold_w;
  logic [3:0] hold_lane, hold_end;
  logic bid_push, bid_full, bid_empty;
  logic [31:0] bid_dout;
  logic [$clog2(BID_FIFO_DEPTH):0] bid_count;
  logic first_beat;  // next beat is the first of its burst
  wire [1:0] tag_kind = tag_dout[9:8];
  wire io_r = m_axi_gmem_io_rvalid && !tag_empty;
  always_comb begin
    m_axi_gmem_io_rready = 1'b0;
    case (tag_kind)
      2'(TAG_LEN): m_axi_gmem_io_rready = !tag_empty && !len_valid;
      2'(TAG_Q): m_axi_gmem_io_rready = !tag_empty && !q_full;
      default: m_axi_gmem_io_rready = !tag_empty && !hold_v;
    endcase
  end
  wire io_beat = io_r && m_axi_gmem_io_rready;
  assign q_push = io_beat && tag_kind == 2'(TAG_Q);
  assign tag_pop = io_beat && m_axi_gmem_io_rlast;
  assign bid_push = hold_v;  // room reserved when the burst was issued
  wire [3:0] beat_first = first_beat ? tag_dout[7:4] : 4'd0;
  wire [3:0] beat_last = m_axi_gmem_io_rlast ? tag_dout[3:0] : 4'd15;
  always_comb begin
    bid_release = '0;
    if (io_beat && tag_kind == 2'(TAG_TBL))
      bid_release = ($clog2(BID_FIFO_DEPTH) + 2)'(15 - beat_last + beat_first);
  end
  always_ff @(posedge clk) begin
    if (rst) begin
      len_valid <= 1'b0;
      hold_v <= 1'b0;
      first_beat <= 1'b1;
      bid_resv <= '0;
    end else begin
      if (rs == R_LEN_WAIT && len_valid) len_valid <= 1'b0;
      if (io_beat) first_beat <= m_axi_gmem_io_rlast;
      if (io_beat && tag_kind == 2'(TAG_LEN)) begin
        len_valid <= 1'b1;
        len_value <= m_axi_gmem_io_rdata[32*tag_dout[7:4]+:32];
      end
      if (io_beat && tag_kind == 2'(TAG_TBL)) begin
        hold_v <= 1'b1;
        hold_w <= m_axi_gmem_io_rdata;
        hold_lane <= beat_first;
        hold_end <= beat_last;
      end else if (hold_v) begin
        hold_lane <= hold_lane + 4'd1;
        if (hold_lane == hold_end) hold_v <= 1'b0;
      end
      bid_resv <= bid_resv + (tag_push && rs == R_TBL_AR ? 16 * t_beats : 0) - bid_release -
                  (bid_pop ? 1 : 0);
    end
  end
  mempipe_fifo #(.W(32), .DEPTH(BID_FIFO_DEPTH)) u_bid (
      .clk, .rst, .push(bid_push), .din(hold_w[32*hold_lane+:32]), .full(bid_full), .pop(bid_pop),
      .dout(bid_dout), .empty(bid_empty), .count(bid_count));

  // ================================ digest reads (gmem_dg) =========================================
  logic [$clog2(DG_FIFO_DEPTH)+1:0] dg_resv;  // words requested and not yet consumed
  logic dg_push, dg_full, dg_empty, dg_pop;
  logic [511:0] dg_dout;
  logic [$clog2(DG_FIFO_DEPTH):0] dg_count;
  wire [5:0] page_words = {row_words, 1'b0};
  assign m_axi_gmem_dg_arvalid = !bid_empty && {1'b0, dg_resv} + page_words <= DG_FIFO_DEPTH;
  assign m_axi_gmem_dg_araddr = a_dg + ({32'd0, bid_dout} << pb_log2);
  assign m_axi_gmem_dg_arlen = 8'(page_words - 1);
  assign m_axi_gmem_dg_arsize = 3'd6;
  assign m_axi_gmem_dg_arburst = 2'b01;
  assign bid_pop = m_axi_gmem_dg_arvalid && m_axi_gmem_dg_arready;
  assign dg_push = m_axi_gmem_dg_rvalid && m_axi_gmem_dg_rready;
  assign m_axi_gmem_dg_rready = !dg_full;
  always_ff @(posedge clk) begin
    if (rst) dg_resv <= '0;
    else dg_resv <= dg_resv + (bid_pop ? page_words : 0) - (dg_pop ? 1 : 0);
  end
  mempipe_fifo #(.W(512), .DEPTH(DG_FIFO_DEPTH)) u_dg (
      .clk, .rst, .push(dg_push), .din(m_axi_gmem_dg_rdata), .full(dg_full), .pop(dg_pop),
      .dout(dg_dout), .empty(dg_empty), .count(dg_count));
  // gmem_dg never writes
  assign m_axi_gmem_dg_awaddr = '0;
  assign m_axi_gmem_dg_awlen = '0;
  assign m_axi_gmem_dg_awsize = 3'd6;
  assign m_axi_gmem_dg_awburst = 2'b01;
  assign m_axi_gmem_dg_awvalid = 1'b0;
  assign m_axi_gmem_dg_wdata = '0;
  assign m_axi_gmem_dg_wstrb = '0;
  assign m_axi_gmem_dg_wlast = 1'b0;
  assign m_axi_gmem_dg_wvalid = 1'b0;
  assign m_axi_gmem_dg_bready = 1'b1;

  // ================================ score core and selection =======================================
  localparam int SCORE_DEPTH = 16;
  logic sc_valid, sc_full, sc_empty, sc_pop, core_busy, sel_busy;
  logic [31:0] sc_data, sc_dout;
  logic [$clog2(SCORE_DEPTH):0] sc_count;
  mempipe_score_core #(.MAX_GROUP(MAX_GROUP), .SCORE_CREDITS(SCORE_DEPTH)) u_core (
      .clk, .rst, .group, .row_words, .q_row_words, .dtype, .agg_sum,
      .n_valid(!nc_empty), .n_data(nc_dout), .n_pop(nc_pop),
      .q_valid(!q_empty), .q_data(q_dout), .q_pop,
      .dg_valid(!dg_empty), .dg_data(dg_dout), .dg_pop,
      .score_valid(sc_valid), .score_data(sc_data), .score_ret(sc_pop), .busy(core_busy));
  mempipe_fifo #(.W(32), .DEPTH(SCORE_DEPTH)) u_scores (
      .clk, .rst, .push(sc_valid), .din(sc_data), .full(sc_full), .pop(sc_pop), .dout(sc_dout),
      .empty(sc_empty), .count(sc_count));
  logic sw_valid, sw_ready, row_done;
  logic [63:0] sw_addr;
  logic [31:0] sw_data;
  mempipe_topk_select #(.MAX_TOPK(MAX_TOPK), .MAX_PAGES(MAX_PAGES)) u_select (
      .clk, .rst, .start(run_start), .k, .sinks, .locals, .max_selected(max_sel),
      .pages_base({regs[17], regs[16]}), .counts_base({regs[20], regs[19]}),
      .n_valid(!ns_empty), .n_data(ns_dout), .n_pop(ns_pop),
      .score_valid(!sc_empty), .score_data(sc_dout), .score_pop(sc_pop),
      .wr_valid(sw_valid), .wr_addr(sw_addr), .wr_data(sw_data), .wr_ready(sw_ready),
      .row_done, .busy(sel_busy));

  // ================================ write coalescer (gmem_io) ======================================
  // Consecutive 32-bit writes into the same 64-byte word merge; a word goes out as one single-beat
  // burst with byte strobes when the next write leaves it or the run ends.
  logic wb_v;  // a word is being assembled
  logic [57:0] wb_word;
  logic [511:0] wb_data;
  logic [63:0] wb_strb;
  logic aw_pend, w_pend;  // the flushed word's AW / W not yet accepted
  logic [31:0] writes_out;  // bursts without a B response
  logic [31:0] rows_done;
  wire flushing = aw_pend || w_pend;
  wire need_flush_new = sw_valid && wb_v && sw_addr[63:6] != wb_word;
  wire all_rows = rows_done == num_seqs;
  wire need_flush_end = all_rows && wb_v && !sw_valid && !sel_busy;
  assign sw_ready = !flushing && !need_flush_new;
  assign m_axi_gmem_io_awvalid = aw_pend;
  assign m_axi_gmem_io_wvalid = w_pend;
  assign m_axi_gmem_io_awlen = 8'd0;
  assign m_axi_gmem_io_awsize = 3'd6;
  assign m_axi_gmem_io_awburst = 2'b01;
  assign m_axi_gmem_io_wlast = 1'b1;
  assign m_axi_gmem_io_bready = 1'b1;
  always_ff @(posedge clk) begin
    if (rst || run_start) begin
      wb_v <= 1'b0;
      aw_pend <= 1'b0;
      w_pend <= 1'b0;
      writes_out <= '0;
      rows_done <= '0;
    end else begin
      if (row_done) rows_done <= rows_done + 1;
      if (aw_pend && m_axi_gmem_io_awready) aw_pend <= 1'b0;
      if (w_pend && m_axi_gmem_io_wready) w_pend <= 1'b0;
      writes_out <= writes_out + ((!flushing && (need_flush_new || need_flush_end)) ? 1 : 0) -
                    (m_axi_gmem_io_bvalid ? 1 : 0);
      if (!flushing && (need_flush_new || need_flush_end)) begin
        aw_pend <= 1'b1;
        w_pend <= 1'b1;
        m_axi_gmem_io_awaddr <= {wb_word, 6'd0};
        m_axi_gmem_io_wdata <= wb_data;
        m_axi_gmem_io_wstrb <= wb_strb;
        wb_v <= 1'b0;
      end else if (sw_valid && sw_ready) begin
        wb_v <= 1'b1;
        wb_word <= sw_addr[63:6];
        if (!wb_v) begin
          wb_data <= '0;
          wb_strb <= '0;
        end
        for (int b = 0; b < 16; b++) begin
          if (sw_addr[5:2] == 4'(b)) begin
            wb_data[32*b+:32] <= sw_data;
            wb_strb[4*b+:4] <= 4'hf;
          end else if (!wb_v) begin
            wb_data[32*b+:32] <= 32'd0;
            wb_strb[4*b+:4] <= 4'h0;
          end
        end
      end
    end
  end
  assign busy_any = core_busy || sel_busy || !all_rows || wb_v || flushing || writes_out != 0 ||
                    !nc_empty || !ns_empty || !sc_empty;
endmodule
