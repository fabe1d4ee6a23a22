// mempipe fpga rtl: the page-score datapath of mempipe_score_topk (retriever/relevancy.h order).
//
// Per sequence: pop n (pages), load the group's query rows (group x head_dim fp32, from the query
// word stream) into two 512-bit banks, then score n pages from the digest word stream (each page
// its max row then its min row, row_words words each). One (query head, digest word) pair per
// clock: 32 lanes x 2 fp32 multipliers, max, lane accumulate; then the adder tree
// lane[i] += lane[i + s], s = 16, 8, 4, 2, 1 (5 pipelined levels) and the group aggregation
// (max or sum, head order). The fp32 units are pipelined (mempipe_fp32.sv: ADD_STAGES = 4,
// MUL_STAGES = 5), so a lane's running sum for one head is ready again only ADD_STAGES clocks
// after its last term: the pairs are issued word-major, head-minor (for each digest word w, heads
// 0..group-1), each (lane, head) sum kept in a small per-lane RAM, with idle issue slots when the
// group is smaller than ADD_STAGES. Pages are double-buffered, so loading page p+1 overlaps p:
//   clocks per page = row_words * max(group, ADD_STAGES)    (>= 2: two rows arrive 1 word/clock)
// The aggregation in sum mode is one pipelined add per head (ADD_STAGES clocks each, in head
// order), max mode one compare per clock; a FIFO of head sums decouples it from the tree, so it
// paces the core only when group * ADD_STAGES > row_words * max(group, ADD_STAGES).
//
// Canonical lane order: 16-bit types hold 32 channels per word, channel c = 32w + e in lane e;
// fp32 holds 16, channel c = 16w + e in lane 16 (w mod 2) + e. Each lane starts at +0 and adds
// its terms max(q*mx, q*mn) in increasing channel order, exactly as PageBound does.
module mempipe_score_core #(
    parameter int MAX_GROUP = 16,  // at most 16 (the head counter and the head FIFO)
    parameter int SCORE_CREDITS = 16  // depth of the score FIFO after this core
) (
    input  logic         clk,
    input  logic         rst,
    // configuration, stable during a run
    input  logic [4:0]   group,      // 1..MAX_GROUP
    input  logic [4:0]   row_words,  // digest row words: 2..16
    input  logic [4:0]   q_row_words,  // query row words: 4..16
    input  logic [1:0]   dtype,      // 0 fp32, 1 fp16, 2 bf16
    input  logic         agg_sum,    // 0 max, 1 sum
    // pages per sequence
    input  logic         n_valid,
    input  logic [31:0]  n_data,
    output logic         n_pop,
    // query words
    input  logic         q_valid,
    input  logic [511:0] q_data,
    output logic         q_pop,
    // digest words
    input  logic         dg_valid,
    input  logic [511:0] dg_data,
    output logic         dg_pop,
    // page scores, in page order; score_ret returns one credit (the consumer popped a score)
    output logic         score_valid,
    output logic [31:0]  score_data,
    input  logic         score_ret,
    output logic         busy
);
  localparam int QDEPTH = MAX_GROUP * 8;  // 512-bit words per bank (max group x 256 fp32 / 2)
  localparam int QAW = $clog2(QDEPTH);
  localparam int NSLOT = 2;

  wire dt32 = dtype == 2'd0;
  wire dtbf = dtype == 2'd2;

  // ---- page buffer: NSLOT slots of (max row, min row), 16 words each --------------------------
  logic [511:0] mx_mem[NSLOT * 16];
  logic [511:0] mn_mem[NSLOT * 16];
  logic [0:0] ld_slot;
  logic [4:0] ld_word;
  logic [1:0] slots_full;
  wire ld_is_mn = ld_word >= row_words;
  wire [4:0] ld_row_w = ld_is_mn ? ld_word - row_words : ld_word;
  assign dg_pop = dg_valid && slots_full < NSLOT;
  wire ld_page_done = dg_pop && ld_word == 2 * row_words - 1;
  always_ff @(posedge clk) begin
    if (dg_pop && !ld_is_mn) mx_mem[{ld_slot, ld_row_w[3:0]}] <= dg_data;
    if (dg_pop && ld_is_mn) mn_mem[{ld_slot, ld_row_w[3:0]}] <= dg_data;
    if (rst) begin
      ld_slot <= '0;
      ld_word <= '0;
    end else if (dg_pop) begin
      ld_word <= ld_page_done ? 5'd0 : ld_word + 5'd1;
      if (ld_page_done) ld_slot <= ld_slot + 1'b1;
    end
  end

  // ---- query banks: word j of the group's rows in bank j mod 2 at j / 2 ------------------------
  logic [511:0] q_bank0[QDEPTH];
  logic [511:0] q_bank1[QDEPTH];

  // ---- issue: per sequence, queries then pages x words x heads ---------------------------------
  localparam int ADD_STAGES = 4;  // mempipe_fp32_add: 3 inner registers + the caller's
  localparam int MUL_STAGES = 5;  // mempipe_fp32_mul: 4 inner registers + the caller's
  localparam int HF_DEPTH = 2 * MAX_GROUP;  // head sums between the tree and the aggregation
  typedef enum logic [1:0] {
    S_N,
    S_Q,
    S_P
  } state_t;
  state_t st;
  logic [31:0] n_left;  // pages still to issue in this sequence
  logic [8:0] q_cnt;
  logic [4:0] g, w;  // issue slot: word w, head g (g >= group: an idle slot)
  logic [4:0] g_slots;  // max(group, ADD_STAGES)
  logic [QAW-1:0] q_head_base;  // g * q_row_words / 2
  logic [0:0] rd_slot;
  logic [$clog2(SCORE_CREDITS):0] credits;
  logic [$clog2(HF_DEPTH):0] hf_credits;
  logic hf_pop;
  logic [15:0] pages_out;  // pages issued whose score is not out yet
  logic score_out;
  wire [8:0] q_total = 9'(group) * 9'(q_row_words);
  wire page_start = st == S_P && g == 0 && w == 0;
  wire can_issue = st == S_P && (!page_start || (slots_full != 0 && credits != 0 &&
                                                  hf_credits >= ($clog2(HF_DEPTH) + 1)'(group)));
  wire last_w = w == row_words - 1;
  wire last_slot = g == g_slots - 1;
  wire issue = can_issue;
  wire issue_head = issue && g < group;
  wire page_end = issue && last_w && last_slot;
  assign n_pop = st == S_N && n_valid;
  assign q_pop = st == S_Q && q_valid;

  always_ff @(posedge clk) begin
    if (q_pop && !q_cnt[0]) q_bank0[q_cnt[QAW:1]] <= q_data;
    if (q_pop && q_cnt[0]) q_bank1[q_cnt[QAW:1]] <= q_data;
  end

  always_ff @(posedge clk) begin
    g_slots <= group > 5'(ADD_STAGES) ? group : 5'(ADD_STAGES);
    if (rst) begin
      st <= S_N;
      slots_full <= '0;
      credits <= ($clog2(SCORE_CREDITS) + 1)'(SCORE_CREDITS);
      hf_credits <= ($clog2(HF_DEPTH) + 1)'(HF_DEPTH);
      pages_out <= '0;
      rd_slot <= '0;
      g <= '0;
      w <= '0;
      q_cnt <= '0;
      n_left <= '0;
      q_head_base <= '0;
    end else begin
      slots_full <= slots_full + (ld_page_done ? 2'd1 : 2'd0) - (page_end ? 2'd1 : 2'd0);
      credits <= credits + (score_ret ? 1'b1 : 1'b0) - (issue && page_start ? 1'b1 : 1'b0);
      hf_credits <= hf_credits + (hf_pop ? 1'b1 : 1'b0) -
                    (issue && page_start ? ($clog2(HF_DEPTH) + 1)'(group) : '0);
      pages_out <= pages_out + (issue && page_start ? 1'b1 : 1'b0) - (score_out ? 1'b1 : 1'b0);
      case (st)
        S_N:
        if (n_valid) begin
          n_left <= n_data;
          q_cnt <= '0;
          st <= S_Q;
        end
        S_Q:
        if (q_valid) begin
          q_cnt <= q_cnt + 9'd1;
          if (q_cnt == q_total - 1) st <= n_left == 0 ? S_N : S_P;
        end
        default:
        if (issue) begin
          if (last_slot) begin
            g <= '0;
            q_head_base <= '0;
            if (last_w) begin
              w <= '0;
              rd_slot <= rd_slot + 1'b1;
              n_left <= n_left - 1;
              if (n_left == 1) st <= S_N;
            end else begin
              w <= w + 5'd1;
            end
          end else begin
            g <= g + 5'd1;
            q_head_base <= q_head_base + QAW'(q_row_words >> 1);
          end
        end
      endcase
    end
  end
  assign busy = st != S_N || slots_full != 0 || pages_out != 0;

  // ---- S1: synchronous reads of the page rows and the query words --------------------------------
  logic [511:0] s1_mx, s1_mn, s1_q0, s1_q1;
  logic s1_v, s1_half, s1_init, s1_lastw, s1_firstg, s1_lastg;
  logic [3:0] s1_g;
  wire [QAW-1:0] q_addr = q_head_base + QAW'(dt32 ? w >> 1 : w);
  always_ff @(posedge clk) begin
    s1_mx <= mx_mem[{rd_slot, w[3:0]}];
    s1_mn <= mn_mem[{rd_slot, w[3:0]}];
    s1_q0 <= q_bank0[q_addr];
    s1_q1 <= q_bank1[q_addr];
    s1_v <= !rst && issue_head;
    s1_half <= w[0];
    s1_init <= dt32 ? w < 2 : w == 0;
    s1_lastw <= last_w;
    s1_firstg <= g == 0;
    s1_lastg <= g == group - 1;
    s1_g <= g[3:0];
  end

  // ---- S2: decode to fp32 (registered), then MUL_STAGES of 64 fp32 multipliers -------------------
  // Sideband of a pair: {valid, init, lastw, firstg, lastg, head}, delayed with the datapath.
  localparam int SB = 9;
  logic [32*32-1:0] s2_q, s2_mx, s2_mn;
  logic [31:0] s2_en;
  logic [SB-1:0] s2_sb;
  for (genvar l = 0; l < 32; l++) begin : g_dec
    logic [31:0] hmx, hmn;
    mempipe_half_to_fp32 u_hmx (.h(s1_mx[16*l+:16]), .f(hmx));
    mempipe_half_to_fp32 u_hmn (.h(s1_mn[16*l+:16]), .f(hmn));
    always_ff @(posedge clk) begin
      s2_q[32*l+:32] <= l < 16 ? s1_q0[32*(l%16)+:32] : s1_q1[32*(l%16)+:32];
      s2_mx[32*l+:32] <= dt32 ? s1_mx[32*(l%16)+:32] : dtbf ? {s1_mx[16*l+:16], 16'd0} : hmx;
      s2_mn[32*l+:32] <= dt32 ? s1_mn[32*(l%16)+:32] : dtbf ? {s1_mn[16*l+:16], 16'd0} : hmn;
      s2_en[l] <= !dt32 || (s1_half == (l >= 16));
    end
  end
  always_ff @(posedge clk)
    s2_sb <= {!rst && s1_v, s1_init, s1_lastw, s1_firstg, s1_lastg, s1_g};

  logic [32*32-1:0] s3_pa, s3_pb;  // lane l at [32l +: 32]
  for (genvar l = 0; l < 32; l++) begin : g_mul
    logic [31:0] pa, pb;
    mempipe_fp32_mul u_pa (.clk, .a(s2_q[32*l+:32]), .b(s2_mx[32*l+:32]), .p(pa));
    mempipe_fp32_mul u_pb (.clk, .a(s2_q[32*l+:32]), .b(s2_mn[32*l+:32]), .p(pb));
    always_ff @(posedge clk) begin
      s3_pa[32*l+:32] <= pa;
      s3_pb[32*l+:32] <= pb;
    end
  end
  // The sideband and lane enables follow the products: MUL_STAGES clocks.
  logic [SB-1:0] mul_sb[MUL_STAGES];
  logic [31:0] mul_en[MUL_STAGES];
  always_ff @(posedge clk) begin
    mul_sb[0] <= rst ? '0 : s2_sb;
    mul_en[0] <= s2_en;
    for (int i = 1; i < MUL_STAGES; i++) begin
      mul_sb[i] <= rst ? '0 : mul_sb[i-1];
      mul_en[i] <= mul_en[i-1];
    end
  end
  wire [SB-1:0] s3_sb = mul_sb[MUL_STAGES-1];
  wire [31:0] s3_en = mul_en[MUL_STAGES-1];

  // ---- S4: term = a > b ? a : b ---------------------------------------------------------------------
  logic [32*32-1:0] s4_t;
  logic [31:0] s4_en;
  logic [SB-1:0] s4_sb;
  for (genvar l = 0; l < 32; l++) begin : g_max
    logic a_gt_b;
    mempipe_fp32_gt u_gt (.a(s3_pa[32*l+:32]), .b(s3_pb[32*l+:32]), .gt(a_gt_b));
    always_ff @(posedge clk) s4_t[32*l+:32] <= a_gt_b ? s3_pa[32*l+:32] : s3_pb[32*l+:32];
  end
  always_ff @(posedge clk) begin
    s4_sb <= rst ? '0 : s3_sb;
    s4_en <= s3_en;
  end

  // ---- S5: lane accumulators, one per (lane, head) in a small RAM ----------------------------------
  // A pair reads its head's running sum (+0 at the head's first term of the page), adds its term
  // in the pipelined adder and writes the sum back ADD_STAGES - 1 clocks later; the same (lane,
  // head) comes round again max(group, ADD_STAGES) clocks later, after the write. A lane without a
  // term in this word (fp32: the other half of the lanes) adds -0, which leaves every sum the
  // adder can hold unchanged (x + -0 == x, NaNs here are already quiet), so every lane is written
  // each slot and the last word's sums are all complete at the adder's output.
  wire s4_v = s4_sb[8], s4_init = s4_sb[7];
  wire [3:0] s4_g = s4_sb[3:0];
  logic [SB-1:0] acc_sb[ADD_STAGES-1];  // sideband through the adder's inner registers
  always_ff @(posedge clk) begin
    acc_sb[0] <= rst ? '0 : s4_sb;
    for (int i = 1; i < ADD_STAGES - 1; i++) acc_sb[i] <= rst ? '0 : acc_sb[i-1];
  end
  wire [SB-1:0] s5_sb = acc_sb[ADD_STAGES-2];
  wire s5_v = s5_sb[8], s5_lastw = s5_sb[6];
  wire [3:0] s5_g = s5_sb[3:0];
  logic [32*32-1:0] s5_sum;
  for (genvar l = 0; l < 32; l++) begin : g_acc
    logic [31:0] acc_mem[MAX_GROUP];
    logic [31:0] sum, run;
    assign run = acc_mem[s4_g];
    mempipe_fp32_add u_add (
        .clk, .a(s4_init && s4_en[l] ? 32'd0 : run),
        .b(s4_en[l] ? s4_t[32*l+:32] : 32'h8000_0000), .s(sum));
    always_ff @(posedge clk) if (s5_v) acc_mem[s5_g] <= sum;
    assign s5_sum[32*l+:32] = sum;
  end

  // ---- adder tree: level k adds lane[i] + lane[i + 32 >> k], each ADD_STAGES clocks ------------------
  // Only a head's complete sums (its last word) enter: one head per clock at most.
  logic [32*32-1:0] t0;
  logic t0_v, t0_first, t0_last;
  always_ff @(posedge clk) begin
    t0 <= s5_sum;
    t0_v <= !rst && s5_v && s5_lastw;
    t0_first <= s5_sb[5];
    t0_last <= s5_sb[4];
  end
  logic [16*32-1:0] t1;
  logic [8*32-1:0] t2;
  logic [4*32-1:0] t3;
  logic [2*32-1:0] t4;
  logic [31:0] t5;
  for (genvar i = 0; i < 16; i++) begin : g_t1
    logic [31:0] s;
    mempipe_fp32_add u (.clk, .a(t0[32*i+:32]), .b(t0[32*(i+16)+:32]), .s(s));
    always_ff @(posedge clk) t1[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 8; i++) begin : g_t2
    logic [31:0] s;
    mempipe_fp32_add u (.clk, .a(t1[32*i+:32]), .b(t1[32*(i+8)+:32]), .s(s));
    always_ff @(posedge clk) t2[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 4; i++) begin : g_t3
    logic [31:0] s;
    mempipe_fp32_add u (.clk, .a(t2[32*i+:32]), .b(t2[32*(i+4)+:32]), .s(s));
    always_ff @(posedge clk) t3[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 2; i++) begin : g_t4
    logic [31:0] s;
    mempipe_fp32_add u (.clk, .a(t3[32*i+:32]), .b(t3[32*(i+2)+:32]), .s(s));
    always_ff @(posedge clk) t4[32*i+:32] <= s;
  end
  logic [31:0] t5_s;
  mempipe_fp32_add u_t5 (.clk, .a(t4[31:0]), .b(t4[63:32]), .s(t5_s));
  always_ff @(posedge clk) t5 <= t5_s;
  localparam int TREE_LAT = 5 * ADD_STAGES;
  logic [TREE_LAT-1:0] tv, tfirst, tlast;
  always_ff @(posedge clk) begin
    tv <= rst ? '0 : {tv[TREE_LAT-2:0], t0_v};
    tfirst <= {tfirst[TREE_LAT-2:0], t0_first};
    tlast <= {tlast[TREE_LAT-2:0], t0_last};
  end

  // ---- head sums FIFO, then the group aggregation in head order: v > agg ? v : agg, or agg + v ----
  logic hf_empty, hf_full;
  logic [33:0] hf_dout;
  logic [$clog2(HF_DEPTH):0] hf_count;
  mempipe_fifo #(.W(34), .DEPTH(HF_DEPTH)) u_heads (
      .clk, .rst, .push(tv[TREE_LAT-1]), .din({tfirst[TREE_LAT-1], tlast[TREE_LAT-1], t5}),
      .full(hf_full), .pop(hf_pop), .dout(hf_dout), .empty(hf_empty), .count(hf_count));
  wire hf_first = hf_dout[33], hf_last = hf_dout[32];
  wire [31:0] v = hf_dout[31:0];
  logic [31:0] agg, agg_sum_v;
  logic [$clog2(ADD_STAGES):0] agg_wait;  // clocks until the pending sum is out (0: none)
  logic agg_pend_last;
  logic v_gt_agg;
  mempipe_fp32_add u_agg (.clk, .a(agg), .b(v), .s(agg_sum_v));
  mempipe_fp32_gt u_agg_gt (.a(v), .b(agg), .gt(v_gt_agg));
  assign hf_pop = !hf_empty && agg_wait == 0;
  wire agg_launch = hf_pop && agg_sum && !hf_first;  // agg + v enters the adder
  wire sum_done = agg_wait == 1;
  always_ff @(posedge clk) begin
    score_valid <= 1'b0;
    score_out <= 1'b0;
    if (rst) begin
      agg_wait <= '0;
    end else if (sum_done) begin
      agg_wait <= '0;
      agg <= agg_sum_v;
      score_valid <= agg_pend_last;
      score_out <= agg_pend_last;
      score_data <= agg_sum_v;
    end else if (agg_wait != 0) begin
      agg_wait <= agg_wait - 1'b1;
    end else if (agg_launch) begin
      agg_wait <= ($clog2(ADD_STAGES) + 1)'(ADD_STAGES - 1);
      agg_pend_last <= hf_last;
    end else if (hf_pop) begin
      agg <= hf_first || !v_gt_agg ? (hf_first ? v : agg) : v;
      score_valid <= hf_last;
      score_out <= hf_last;
      score_data <= hf_first || !v_gt_agg ? (hf_first ? v : agg) : v;
    end
  end
endmodule
